"""Developer tools beside the library: private redis-server processes for tests, demo and benchmarks (not shipped in the wheel)."""
