"""Defects fixed once, planted again: the simulator must find each one by itself.

``python -m tests.sim --mutant NAME`` runs random schedules against the package with that
defect put back, and prints the first violation it finds, shrunk; tests/test_simulation.py
does the same for each, bounded. Each mutant is the smallest change that brings the defect
back, made to the real code in this process (nothing here stands in for dedupe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["BEFORE_READ_FIRST", "MUTANTS", "MUTANT_PARAMS", "planted"]


def _revived_record(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 18.1: the acquire script serves a fresh-looking record of an older lease (it
    does not ask whether the token counter still names the record's lease)."""
    import dedupe.backend.commands as commands

    lua = commands.ACQUIRE.lua
    check = "if lease ~= tok and base ~= tok then return nil end"
    assert check in lua, "the scripts' counter check moved: update this mutant"
    patch(commands, "ACQUIRE", commands._script(lua.replace(check, "")))


def _dated_from_queue(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 18.2: a lease is dated from when its acquire was asked for, before the client's
    queue, not from when it was written (the reply's stamp is dropped)."""
    import dedupe.drivers.base as base

    real = base.parse_acquired
    patch(base, "parse_acquired", lambda raw, sent=0.0: real(raw, 0.0))


def _abandoning_renewer(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 18.2: the renewer gives a lease up for good once the clock says it may be lost,
    although Redis may still hold it."""
    from dedupe.core.leases import LeaseBook

    real = LeaseBook._visit

    def visit(self: Any, lease: Any, now: float) -> Any:
        signal = lease.lost
        lost = signal._set or now >= signal._deadline
        if now < lease.hold_until and not lease._reported and lost:
            self._report(lease, now)
            lease.active = False
            return None
        return real(self, lease, now)

    patch(LeaseBook, "_visit", visit)


def _renewals_ignore_ask(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 18.3: renewals follow MOVED but not ASK while a slot migrates."""
    import dedupe.backend.renewal as renewal

    real = renewal._redirect

    def redirect(reply: Any) -> Any:
        found = real(reply)
        return None if found is not None and found[0] == "ASK" else found

    patch(renewal, "_redirect", redirect)


def _no_give_back(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 18.4: a call that gives up after an acquire it never saw answered leaves the
    lease it may have been granted to run out (waiters wait a whole lease)."""
    from dedupe.backend.commands import translate
    from dedupe.drivers.base import DriverBase

    def failed(self: Any, cmd: Any, exc: BaseException) -> BaseException:
        return translate(exc) if isinstance(exc, Exception) else exc

    patch(DriverBase, "failed", failed)


def _double_refresh(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 20: the acquire script grants a refresh (a background lease) to a caller that
    finds a stale value although a lease is held already (it asks only whether this process
    may run one)."""
    import dedupe.backend.commands as commands

    lua = commands.ACQUIRE.lua
    check = "if pttl >= 0 or not background then"
    assert check in lua, "the scripts' refresh check moved: update this mutant"
    patch(commands, "ACQUIRE", commands._script(lua.replace(check, "if not background then")))


def _wait_before_complete(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 22: a batch waits on the items it follows before it completes the items it led
    (its Completes go after its Subscribes and its waits), so two batches that each lead
    part of the other's items wait on each other."""
    import inspect
    import textwrap

    import dedupe.core.batch as batch

    src = textwrap.dedent(inspect.getsource(batch.run_batch))
    order = "gathered = _next_group(blocked)"
    assert order in src, "the batch machine's order moved: update this mutant"
    src = src.replace(
        order,
        "gathered = _next_group({i: c for i, c in blocked.items()\n"
        "                                     if not (waiting and type(c) is Complete)})",
    )
    space = dict(vars(batch))
    exec(compile(src, batch.__file__, "exec"), space)  # the planted copy of run_batch
    patch(batch, "run_batch", space["run_batch"])
    patch(batch, "_GATHERED", (batch.Acquire, batch.Lead, batch.Subscribe, batch.Complete))


def _read_ignores_counter(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 23's read (MGET and TIME, no script) without the acquire script's counter check:
    a fresh-looking record of an older lease, written back, would be served."""
    import dedupe.core.protocol as protocol

    real = protocol.record_state

    def lax(token: int, keep: int, ttl: int, pttl: int, counter: Any, now: int) -> Any:
        return real(token, keep, ttl, pttl, b"%d" % token, now)  # as if the counter named it

    patch(protocol, "record_state", lax)


def _read_first_serves_stale(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 23's read before any flight (call.served_read) takes the server's clock as
    1.5 s earlier than the read found it: a value up to 1.5 s past its keep is served as
    fresh (the flight's own Read keeps the rule)."""
    import dedupe.core.call as call

    real = call.read_kept

    def lax(codec: Any, looked: Any, channel: str, shape: Any, result_ttl_ms: int) -> Any:
        return real(codec, looked._replace(now_ms=looked.now_ms - 1500), channel, shape,
                    result_ttl_ms)  # fmt: skip

    patch(call, "read_kept", lax)


def _read_hit_strands_joiners(patch: Callable[[Any, str, Any], None]) -> None:
    """Issue 23's read before any flight returns its hit without ending the process's
    flight of the key it created: the callers who joined while it read wait on, and so does
    every later caller of the key in that process."""
    import dedupe.drivers.base as base

    real = base.served_read

    def served(env: Any, table: Any, reads: Any, names: Any, entry: Any, *rest: Any) -> Any:
        finish = table.finish
        table.finish = lambda key, e, result: None if e is entry else finish(key, e, result)
        try:
            return real(env, table, reads, names, entry, *rest)
        finally:
            del table.finish

    patch(base, "served_read", served)


def _cancel_with_waiters(patch: Callable[[Any, str, Any], None]) -> None:
    """An asyncio caller that stops waiting (cancelled, or at its wait_timeout) cancels its
    process's following flight although other callers still await it (it does not ask how
    many are left): they all start over."""
    import dedupe.core.call as call

    def leave(table: Any, entry: Any) -> Any:
        table.leave(entry)
        if not entry.leading:
            yield call.Cancel(entry)

    patch(call, "_leave", leave)


MUTANTS: dict[str, tuple[Callable[[Callable[[Any, str, Any], None]], None], frozenset[str]]] = {
    # name: (plant it, the invariant kinds that may find it)
    "revived-record": (_revived_record, frozenset({"stale-outcome", "older-outcome"})),
    "read-ignores-counter": (
        _read_ignores_counter,
        frozenset({"stale-outcome", "older-outcome"}),
    ),
    "dated-from-queue": (_dated_from_queue, frozenset({"lease-dated-early"})),
    "abandoning-renewer": (_abandoning_renewer, frozenset({"lapsed-lease"})),
    "renewals-ignore-ask": (_renewals_ignore_ask, frozenset({"lapsed-lease"})),
    "no-give-back": (_no_give_back, frozenset({"orphaned-lease"})),
    # A second refresh overwrites the live lock of the first: found as that, or as a leader
    # unaware of its lost lease, or as two refreshes at once.
    "double-refresh": (
        _double_refresh,
        frozenset({"double-refresh", "lock-overwrite", "unaware-leader"}),
    ),
    "wait-before-complete": (_wait_before_complete, frozenset({"batch-deadlock"})),
    "read-first-serves-stale": (_read_first_serves_stale, frozenset({"stale-hit"})),
    "read-hit-strands-joiners": (_read_hit_strands_joiners, frozenset({"stuck-call"})),
    "cancel-with-waiters": (_cancel_with_waiters, frozenset({"cancel-spread"})),
}

# The world a mutant needs (Params fields), where it is not the default one. The defects
# fixed before the read before any flight (issue 23) are looked for in the schedules drawn
# as they were then (no read first, refusals or cancels): the same searches, as long.
BEFORE_READ_FIRST: dict[str, Any] = {"read_first": 0.0, "refusals": False, "cancels": False}
MUTANT_PARAMS: dict[str, dict[str, Any]] = {
    "revived-record": BEFORE_READ_FIRST,
    "read-ignores-counter": BEFORE_READ_FIRST,
    "dated-from-queue": BEFORE_READ_FIRST,
    "abandoning-renewer": BEFORE_READ_FIRST,
    "renewals-ignore-ask": BEFORE_READ_FIRST,
    "no-give-back": BEFORE_READ_FIRST,
    "double-refresh": {"cache": True, **BEFORE_READ_FIRST},
    "wait-before-complete": {"batches": True, **BEFORE_READ_FIRST},
}


@contextmanager
def planted(name: str) -> Iterator[frozenset[str]]:
    """Plant mutant ``name`` in this process for the block; yields the kinds that find it."""
    plant, kinds = MUTANTS[name]
    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, value: Any) -> None:
        undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    plant(patch)
    try:
        yield kinds
    finally:
        for owner, attr, value in reversed(undo):
            setattr(owner, attr, value)
