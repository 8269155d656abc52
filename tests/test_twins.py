"""The sync/async twins that remain stay twins: one is the other with ``await`` taken out.

Every decision lives once, in the core's machines; what is left written twice is each
driver's stepper (it blocks, or awaits) and the wire's round trip (a socket, or a stream).
Each pair below is compared as code, with ``async``/``await`` stripped and the names that
differ only by their I/O mapped onto each other; what still differs must be exactly the
known, I/O-only differences listed here. A change to one twin without the other fails.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import dedupe.backend.wire as wire
import dedupe.drivers.aio as aio
import dedupe.drivers.sync as sync

# Names that differ between the twins only because one blocks and the other awaits.
_SAME = {
    "wait_async": "wait",
    "get_async": "get",
    "_aroundtrip": "_roundtrip",
    "_apipeline": "_pipeline",
    "_aread": "_read",
    "_areplies": "_replies",
    "aread_replies": "read_replies",
    "AsyncReplies": "Replies",
}

# What the twins may still differ in, after that: each line is sync's then async's.
_KNOWN: dict[str, set[str]] = {
    "_Driver.execute": {
        # WAIT for replicas runs on the sync client: on a thread of ours for asyncio.
        "-client = self.backend.sync_client()",
        "-raw, acked = acquire_and_wait(self.backend.transport, client, script, self.spec,"
        " self.stamp)",
        "+backend = self.backend",
        "+client = backend.in_thread(backend.sync_client)",
        "+raw, acked = backend.in_thread(acquire_and_wait, backend.transport, client, script,"
        " self.spec, self.stamp)",
        # A thread's slot wait is bounded by the caller's deadline; asyncio callers wait
        # on the flight's task with their own deadline instead.
        "-raw = self.backend.run_sync_script(script, self.stamp, self.spec.deadline)",
        "+raw = self.backend.run_async_script(script, self.stamp)",
        "-raw = self.backend.run_sync_script(script, None, self.spec.deadline)",
        "+raw = self.backend.run_async_script(script)",
        "-return self.reply_of(cmd, self.backend.run_sync_script(script))",
        "+return self.reply_of(cmd, self.backend.run_async_script(script))",
        "-time.sleep(cmd.seconds)",
        "+asyncio.sleep(cmd.seconds)",
        # asyncio carries Lead and Wait in drive() itself, so that a waiting flight holds no
        # coroutine of execute's (issue 23's memory per flight); there, the hub's callback on
        # the loop steps the flight with the message itself (step_ahead).
        "-if type(cmd) is Lead:",
        "-flight = self.flight_of(cmd)",
        "-try:",
        "-with self.as_leader(flight):",
        "-return Outcome(value=self.fn(*self.args, **self.kwargs))",
        "-except BaseException as exc:",
        "-return Outcome(error=exc)",
        "-if type(cmd) is Wait:",
        "-return self.mailbox.get(cmd.timeout)",
    },
    "_run_here": {
        "-def _run_here(backend: Backend, names: Names, entry: Entry, fn: Callable[..., Any],"
        " args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:",
        "+def _run_here(backend: Backend, names: Names, entry: Entry, fn: Fn, args: tuple[Any,"
        " ...], kwargs: dict[str, Any]) -> Outcome:",
    },
    "SyncWire.run_on": set(),
    "SyncWire.run_many_on": set(),
    "SyncWire._on": {
        # The round trip it is handed: a function, or a coroutine function.
        "-def _on(self, conn: Any, trip: Callable[[Any, Any, Any, Replies], Any], what: Any,"
        " stamps: Any) -> Any:",
        "+def _on(self, conn: Any, trip: Callable[[Any, Any, Any, Replies], Awaitable[Any]],"
        " what: Any, stamps: Any) -> Any:",
        # redis.asyncio closes without waiting for the peer (a half-open link would hang).
        "-conn.disconnect()",
        "+conn.disconnect(nowait=True)",
        "-fresh.disconnect()",
        "+fresh.disconnect(nowait=True)",
    },
    "SyncWire.run": {
        "-return conn.retry.call_with_retry(partial(_roundtrip, conn, call, stamp, _replies),"
        " conn.disconnect)",
        "+return conn.retry.call_with_retry(partial(_roundtrip, conn, call, stamp, _replies),"
        " lambda error: conn.disconnect())",
    },
    "_roundtrip": {
        # A socket, or a stream writer (written straight to its transport: wire._asend).
        "-if conn._sock is None:",
        "+if getattr(conn, '_writer', None) is None:",
        "-conn.send_packed_command(pack(call))",
        "+_asend(conn, pack(call))",
        "-conn.send_packed_command(pack(call, by_sha=False))",
        "+_asend(conn, pack(call, by_sha=False))",
    },
    "_pipeline": {
        "-if conn._sock is None:",
        "+if getattr(conn, '_writer', None) is None:",
        "-conn.send_packed_command(pack_many(calls))",
        "+_asend(conn, pack_many(calls))",
        "-conn.send_packed_command(pack_many([calls[i] for i in again], by_sha=False))",
        "+_asend(conn, pack_many([calls[i] for i in again], by_sha=False))",
    },
}

_PAIRS: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
    ("_Driver.execute", sync._Driver.execute, aio._Driver.execute),
    ("_run_here", sync._run_here, aio._run_here),
    ("SyncWire.run_on", wire.SyncWire.run_on, wire.AsyncWire.run_on),
    ("SyncWire.run_many_on", wire.SyncWire.run_many_on, wire.AsyncWire.run_many_on),
    ("SyncWire._on", wire.SyncWire._on, wire.AsyncWire._on),
    ("SyncWire.run", wire.SyncWire.run, wire.AsyncWire.run),
    ("_roundtrip", wire._roundtrip, wire._aroundtrip),
    ("_pipeline", wire._pipeline, wire._apipeline),
]


class _Unasync(ast.NodeTransformer):
    def visit_Await(self, node: ast.Await) -> Any:
        return self.visit(node.value)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> Any:
        node = self.generic_visit(node)  # type: ignore[assignment]
        sync_def = ast.FunctionDef(**{f: getattr(node, f) for f in node._fields})
        sync_def.name = _SAME.get(node.name, node.name)
        return ast.copy_location(sync_def, node)

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        self.generic_visit(node)
        node.attr = _SAME.get(node.attr, node.attr)
        return node

    def visit_Name(self, node: ast.Name) -> Any:
        node.id = _SAME.get(node.id, node.id)
        return node


def _lines(fn: Callable[..., Any]) -> list[str]:
    tree = _Unasync().visit(ast.parse(textwrap.dedent(inspect.getsource(fn))))
    body = tree.body[0]
    if ast.get_docstring(body):
        body.body = body.body[1:]  # the docstrings may say what differs
    return [line.strip() for line in ast.unparse(tree).splitlines()]


@pytest.mark.parametrize(("name", "sync_fn", "async_fn"), _PAIRS, ids=[p[0] for p in _PAIRS])
def test_the_twins_differ_only_by_their_io(
    name: str, sync_fn: Callable[..., Any], async_fn: Callable[..., Any]
) -> None:
    diff = difflib.unified_diff(_lines(sync_fn), _lines(async_fn), lineterm="", n=0)
    found = {line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))}
    assert found == _KNOWN[name], (
        f"{name}: the twins drifted apart; change both, or say here why they differ.\n"
        + "\n".join(sorted(found ^ _KNOWN[name]))
    )
