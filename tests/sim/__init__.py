"""A deterministic simulator of the flight protocol: real run_flight, real Lua, simulated world.

- ``redis.py``: one Redis running the package's own Lua scripts (Lua 5.1 through lupa);
- ``world.py``: processes (flight table, hub, renewer stand-in, drifting clock), the network,
  the drivers that carry ``run_flight``'s commands, and the invariants checked after each step;
- ``schedule.py``: seeded random schedules, replay, and shrinking by delta debugging.

``python -m tests.sim --help`` (or ``make simulate``) runs it; ``--package DIR`` runs it on
another checkout (e.g. ``git worktree add /tmp/old <commit>``). tests/test_simulation.py runs
a bounded share of it inside ``make test``.
"""
