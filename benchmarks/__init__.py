"""Side-by-side benchmarks of dedupe against raw redis-py and the Python peers (issue 5).

Run ``python -m benchmarks`` (about 10 minutes) or ``python -m benchmarks --quick`` (under 2).
It starts its own redis-server on a free loopback port, runs every scenario with the tools
interleaved in the same run, and writes ``benchmarks/results/latest.md`` plus PNG plots (a
``--quick`` run writes them to ``benchmarks/results/quick/``, git-ignored, so the committed full
results stay).
``python -m benchmarks.profile`` profiles dedupe's hot paths with pyinstrument.
"""
