"""Developer tools beside the library, never shipped in the wheel.

``servers``: private redis-server processes (standalone, Cluster, Sentinel) for the tests, the
demo, the benchmarks and the soak run; ``demo``: the ``make demo`` launcher; ``compat``: the
``make compat`` matrix of redis-py releases.
"""
