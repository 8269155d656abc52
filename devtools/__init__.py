"""Developer tools beside the library, never shipped in the wheel.

``servers``: private redis-server (or Valkey) processes (standalone, Cluster, Sentinel) for the
tests, the demo, the benchmarks and the soak run; ``demo``: the ``make demo`` launcher;
``compat``: the ``make compat`` matrix of redis-py releases and servers; ``pythons``: ``make
test-pythons``, the tests on each supported Python found; ``pins``: ``make upgrade-deps``, which
regenerates constraints/dev.txt; ``docs_hooks``: the mkdocs hooks of ``make docs``.
"""
