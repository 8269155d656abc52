"""A deterministic simulator of the flight protocol: real run_flight, real Lua, simulated world.

``python -m tests.sim --help`` runs it; tests/test_simulation.py runs a bounded share of it.
"""
