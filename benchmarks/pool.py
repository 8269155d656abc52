"""A pool of spawned worker processes that run the cross-process scenarios in lock step.

The parent hands every worker the same task. Each worker builds the tool, warms it up (opens
its connections, loads its scripts, and for pub/sub tools subscribes once), then meets the
others and the parent at the ``phase`` barrier. The parent resets the server's command stats
while every worker holds still, and a second ``phase`` barrier starts the measured part. Within
it, the workers meet at the ``keybar`` barrier before each key, so every caller in every
process calls the same cold key at the same instant.

Timestamps are ``time.monotonic_ns()``, which is one clock for every process on Linux.
Every wait is bounded; a worker that fails aborts both barriers so no one hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import multiprocessing as mp
import queue
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from . import counting
from .tools import ASYNC_TOOLS, SYNC_TOOLS, Job

BARRIER_TIMEOUT = 180.0  # one key of a polling peer with 64 callers takes seconds, not minutes


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """``n`` spawned processes, started once and reused by every cross-process scenario."""

    def __init__(self, n: int, url: str) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.url = url
        self.phase = ctx.Barrier(n + 1)
        self.keybar = ctx.Barrier(n)
        self.results: Any = ctx.Queue()
        self.commands: list[Any] = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(i, n, url, self.commands[i], self.results, self.phase, self.keybar),
                name=f"bench-worker-{i}",
                daemon=True,
            )
            for i in range(n)
        ]
        for p in self.procs:
            p.start()
        self.run({"kind": "ping"})  # every worker is up and imported

    def run(
        self, task: dict[str, Any], *, on_ready: Callable[[], None] | None = None
    ) -> list[dict[str, Any]]:
        """Run ``task`` in every worker; ``on_ready`` runs while all of them hold still."""
        for q in self.commands:
            q.put(task)
        if task["kind"] != "ping":
            try:
                self.phase.wait(BARRIER_TIMEOUT)  # warmed up
                if on_ready is not None:
                    on_ready()
                self.phase.wait(BARRIER_TIMEOUT)  # go
            except threading.BrokenBarrierError:
                pass  # a worker failed; its error arrives below
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + float(task.get("timeout", 900))
        while len(results) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"workers timed out on {task.get('kind')} {task.get('tool')}")
            try:
                idx, res = self.results.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise WorkerError(f"worker(s) died: {dead}") from None
                continue
            results[idx] = res
        errors = [r["error"] for r in results.values() if "error" in r]
        if errors:
            raise WorkerError(f"{task.get('kind')} {task.get('tool')} failed:\n" + errors[0])
        return [results[i] for i in range(self.n)]

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                p.terminate()  # our own child, by its handle
                p.join(timeout=5)


# --------------------------------------------------------------------------- worker side


def worker_main(
    idx: int, n: int, url: str, commands: Any, results: Any, phase: Any, keybar: Any
) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where a stuck worker is
    counting.install()
    install_legs()
    while True:
        try:
            task = commands.get(timeout=3600)
        except queue.Empty:
            return
        if task is None:
            return
        try:
            res = _run(idx, n, url, task, phase, keybar)
        except BaseException:
            res = {"error": f"worker {idx}:\n{traceback.format_exc()}"}
            phase.abort()
            keybar.abort()
        results.put((idx, res))


def _run(
    idx: int, n: int, url: str, task: dict[str, Any], phase: Any, keybar: Any
) -> dict[str, Any]:
    kind = task["kind"]
    if kind == "ping":
        return {}
    job = Job(task.get("job_s", 0.0), b"x" * task.get("payload", 1024))
    ctx = _Ctx(idx, n, url, task, job, phase, keybar)
    if kind == "wake" and task["tool"] == "raw PUBLISH→receive":
        return _wake_raw(ctx)
    if task["mode"] == "sync":
        tool = SYNC_TOOLS[task["tool"]](url, task["prefix"], job, task.get("ttl", 60.0))
        try:
            return _run_sync(ctx, tool)
        finally:
            tool.close()
    return asyncio.run(_run_async(ctx))


class _Ctx:
    def __init__(
        self,
        idx: int,
        n: int,
        url: str,
        task: dict[str, Any],
        job: Job,
        phase: Any,
        keybar: Any,
    ) -> None:
        self.idx, self.n, self.url, self.task, self.job = idx, n, url, task, job
        self.phase, self.keybar = phase, keybar
        self.base = 0
        self.cpu0 = 0.0

    def go(self) -> None:
        """Warm-up done: meet the parent (it resets server stats), then start measuring."""
        self.phase.wait(BARRIER_TIMEOUT)
        self.phase.wait(BARRIER_TIMEOUT)
        self.job.reset()
        legs()  # drop the warm-up's stamps
        self.base = counting.value()
        self.cpu0 = time.process_time()

    def finish(self, **res: Any) -> dict[str, Any]:
        res["client_cmds"] = counting.value() - self.base
        res["cpu_s"] = time.process_time() - self.cpu0
        res["executions"] = self.job.executions
        res["done_ns"] = dict(self.job.done_ns)
        res["legs"] = legs()
        return res


@contextlib.contextmanager
def _profiled(ctx: _Ctx, enabled: bool) -> Iterator[None]:
    """With ``task["profile"]`` set, profile this thread with pyinstrument into that folder."""
    out = ctx.task.get("profile")
    if not (out and enabled):
        yield
        return
    from pyinstrument import Profiler

    prof = Profiler(interval=0.0005, async_mode="disabled")
    prof.start()
    try:
        yield
    finally:
        prof.stop()
        name = f"{ctx.task['kind']}-{ctx.task['mode']}-worker{ctx.idx}.txt"
        Path(out, name).write_text(prof.output_text(unicode=True, show_all=False))


# --- sync ---------------------------------------------------------------------------------


def _threads(count: int, target: Callable[[int], None]) -> list[threading.Thread]:
    ts = [threading.Thread(target=target, args=(t,), daemon=True) for t in range(count)]
    for t in ts:
        t.start()
    return ts


def _join(ts: list[threading.Thread]) -> None:
    deadline = time.monotonic() + BARRIER_TIMEOUT
    for t in ts:
        t.join(max(0.1, deadline - time.monotonic()))
    if any(t.is_alive() for t in ts):
        raise WorkerError("caller threads did not finish in time")


def _warm_sync(ctx: _Ctx, tool: Any, threads: int) -> None:
    """Open a connection per thread, load scripts; for dedupe, follow across processes once."""
    ts = _threads(threads, lambda t: tool.get(f"warm:{ctx.idx}:{t}"))
    _join(ts)
    ctx.keybar.wait(BARRIER_TIMEOUT)
    if tool.name.startswith("dedupe"):
        tool.get("warm:shared")  # one caller per process: opens the pub/sub hub connection


def _run_sync(ctx: _Ctx, tool: Any) -> dict[str, Any]:
    task = ctx.task
    kind = task["kind"]
    threads = task.get("threads", 1)
    _warm_sync(ctx, tool, threads)
    expected = ctx.job.payload
    wrong = [0]
    errors: list[str] = []

    def call(key: str) -> tuple[int, int]:
        t0 = time.monotonic_ns()
        try:
            value = tool.get(key)
        except Exception as exc:
            errors.append(repr(exc))
            value = None
        t1 = time.monotonic_ns()
        if value != expected:
            wrong[0] += 1
        return t0, t1

    if kind == "stampede":
        return _stampede_sync(ctx, call, threads, wrong, errors)
    if kind == "steady":
        return _steady_sync(ctx, call, threads, wrong, errors)
    if kind == "wake":
        return _wake_sync(ctx, call)
    raise ValueError(kind)


def _stampede_sync(
    ctx: _Ctx,
    call: Callable[[str], tuple[int, int]],
    threads: int,
    wrong: list[int],
    errors: list[str],
) -> dict[str, Any]:
    keys: list[str] = ctx.task["keys"]
    start = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)
    lat: list[list[int]] = [[] for _ in range(threads)]
    rets: list[list[tuple[str, int]]] = [[] for _ in range(threads)]

    def caller(t: int) -> None:
        with _profiled(ctx, t == 0):
            for key in keys:
                start.wait(BARRIER_TIMEOUT)
                t0, t1 = call(key)
                lat[t].append(t1 - t0)
                rets[t].append((key, t1))
                done.wait(BARRIER_TIMEOUT)

    ctx.go()
    ts = _threads(threads, caller)
    spans = []
    for _key in keys:
        ctx.keybar.wait(BARRIER_TIMEOUT)
        s = time.monotonic_ns()
        start.wait(BARRIER_TIMEOUT)
        done.wait(BARRIER_TIMEOUT)
        spans.append((s, time.monotonic_ns()))
    _join(ts)
    return ctx.finish(
        lat_ns=[x for row in lat for x in row],
        ret_ns=[x for row in rets for x in row],
        spans=spans,
        wrong=wrong[0],
        errors=errors[:5],
    )


def _steady_sync(
    ctx: _Ctx,
    call: Callable[[str], tuple[int, int]],
    threads: int,
    wrong: list[int],
    errors: list[str],
) -> dict[str, Any]:
    keys: list[str] = ctx.task["keys"]
    start = threading.Barrier(threads + 1)
    lat: list[list[int]] = [[] for _ in range(threads)]

    def caller(t: int) -> None:
        order = list(keys)
        random.Random(f"{ctx.task['seed']}:{ctx.idx}:{t}").shuffle(order)
        start.wait(BARRIER_TIMEOUT)
        for key in order:
            t0, t1 = call(key)
            lat[t].append(t1 - t0)

    ctx.go()
    ts = _threads(threads, caller)
    ctx.keybar.wait(BARRIER_TIMEOUT)
    s = time.monotonic_ns()
    start.wait(BARRIER_TIMEOUT)
    _join(ts)
    spans = [(s, time.monotonic_ns())]
    return ctx.finish(
        lat_ns=[x for row in lat for x in row], spans=spans, wrong=wrong[0], errors=errors[:5]
    )


def _wake_sync(ctx: _Ctx, call: Callable[[str], tuple[int, int]]) -> dict[str, Any]:
    """Worker 0 leads each key; the others join ``delay`` later and follow."""
    keys: list[str] = ctx.task["keys"]
    delay = ctx.task["delay"]
    followers = ctx.task.get("followers", ctx.n - 1)
    ctx.go()
    calls = []
    for key in keys:
        ctx.keybar.wait(BARRIER_TIMEOUT)
        if ctx.idx > followers:
            continue  # this run has fewer followers: wait at the barriers only
        if ctx.idx:
            time.sleep(delay)
        t0, t1 = call(key)
        calls.append((key, t0, t1))
    return ctx.finish(calls=calls)


# --- async --------------------------------------------------------------------------------


async def _run_async(ctx: _Ctx) -> dict[str, Any]:
    task = ctx.task
    tool = ASYNC_TOOLS[task["tool"]](ctx.url, task["prefix"], ctx.job, task.get("ttl", 60.0))
    await tool.start()
    try:
        return await _run_async_tool(ctx, tool)
    finally:
        await tool.close()


async def _run_async_tool(ctx: _Ctx, tool: Any) -> dict[str, Any]:
    task = ctx.task
    kind = task["kind"]
    tasks = task.get("tasks", 1)
    expected = ctx.job.payload
    wrong = 0
    errors: list[str] = []

    rets: list[tuple[str, int]] = []

    async def call(key: str, t0: int) -> int:
        nonlocal wrong
        try:
            value = await tool.get(key)
        except Exception as exc:
            errors.append(repr(exc))
            value = None
        if value != expected:
            wrong += 1
        t1 = time.monotonic_ns()
        rets.append((key, t1))
        return t1 - t0

    # warm-up: connections, scripts, and the contended path once
    now = time.monotonic_ns()
    await asyncio.gather(*(call(f"warm:{ctx.idx}:{t}", now) for t in range(tasks)))
    ctx.keybar.wait(BARRIER_TIMEOUT)
    if tool.name.startswith("dedupe"):
        await call("warm:shared", now)  # opens the pub/sub hub connection
    wrong, errors[:], rets[:] = 0, [], []

    keys: list[str] = task["keys"]
    if kind == "stampede":
        ctx.go()
        lat: list[int] = []
        spans = []
        with _profiled(ctx, True):
            for key in keys:
                # Blocking the loop here is fine: the previous key is done, nothing else runs.
                ctx.keybar.wait(BARRIER_TIMEOUT)
                s = time.monotonic_ns()
                lat += await asyncio.gather(*(call(key, s) for _ in range(tasks)))
                spans.append((s, time.monotonic_ns()))
        return ctx.finish(lat_ns=lat, ret_ns=rets, spans=spans, wrong=wrong, errors=errors[:5])
    if kind == "wake":
        delay = task["delay"]
        followers = task.get("followers", ctx.n - 1)
        ctx.go()
        calls = []
        for key in keys:
            ctx.keybar.wait(BARRIER_TIMEOUT)
            if ctx.idx > followers:
                continue  # this run has fewer followers: wait at the barriers only
            if ctx.idx:
                await asyncio.sleep(delay)
            t0 = time.monotonic_ns()
            await call(key, t0)
            calls.append((key, t0, time.monotonic_ns()))
        return ctx.finish(calls=calls)
    raise ValueError(kind)


# --- raw pub/sub baseline ----------------------------------------------------------------


def _subscriber(url: str, channel: str, out: queue.SimpleQueue[tuple[bytes, int]]) -> Any:
    """A redis-py connection subscribed to ``channel``, and a thread blocked reading it.

    The fastest redis-py receives a message: a thread parked in the socket read, which stamps
    each message the moment redis-py has parsed it. It ends on the message ``b"end"``."""
    import redis.connection as sconn

    pool = redis.ConnectionPool.from_url(url)
    kwargs = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k not in ("socket_timeout", "protocol") and not k.startswith("maint_notif")
    }
    # RESP2: the messages come back from read_response (RESP3 hands pushes to a handler).
    conn: Any = sconn.Connection(**kwargs, socket_timeout=None, protocol=2)  # type: ignore[no-untyped-call]
    conn.connect()
    conn.send_command("SUBSCRIBE", channel)
    ack = conn.read_response()
    if not (isinstance(ack, list) and ack[0] == b"subscribe"):
        raise WorkerError(f"unexpected subscribe reply {ack!r}")

    def read() -> None:
        while True:
            try:
                reply = conn.read_response()
            except Exception:
                return
            t = time.monotonic_ns()
            if isinstance(reply, list) and reply[0] == b"message":
                if reply[2] == b"end":
                    return
                out.put((reply[2], t))

    th = threading.Thread(target=read, name="raw-subscriber", daemon=True)
    th.start()
    return conn, th


def _wake_raw(ctx: _Ctx) -> dict[str, Any]:
    """Worker 0 publishes ``hold`` after each barrier; followers 1..F receive it on a thread
    blocked on its socket (the others wait at the barriers only)."""
    task = ctx.task
    channel = f"{task['prefix']}:ch"
    followers = task.get("followers", ctx.n - 1)
    r = redis.Redis.from_url(ctx.url)
    got_q: queue.SimpleQueue[tuple[bytes, int]] = queue.SimpleQueue()
    sub: Any = None
    try:
        if 0 < ctx.idx <= followers:
            sub = _subscriber(ctx.url, channel, got_q)
        else:
            deadline = time.monotonic() + 10
            while r.pubsub_numsub(channel)[0][1] < followers:  # every follower subscribed
                if time.monotonic() > deadline:
                    raise WorkerError("raw subscribers did not subscribe in 10 s")
                time.sleep(0.01)
        ctx.keybar.wait(BARRIER_TIMEOUT)  # everyone subscribed
        ctx.go()
        calls = []
        done: dict[str, int] = {}
        payload = ctx.job.payload
        for key in task["keys"]:
            ctx.keybar.wait(BARRIER_TIMEOUT)
            if ctx.idx == 0:
                time.sleep(task["hold"])
                t_done = time.monotonic_ns()
                r.publish(channel, key.encode() + b"|" + payload)
                done[key] = t_done
                continue
            if sub is None:
                continue
            t0 = time.monotonic_ns()
            end = time.monotonic() + 5
            got = -1
            want = key.encode() + b"|"
            while (left := end - time.monotonic()) > 0:
                try:
                    data, t = got_q.get(timeout=left)
                except queue.Empty:
                    break
                if data.startswith(want):
                    got = t
                    break
            calls.append((key, t0, got))
        if ctx.idx == 0:
            r.publish(channel, b"end")
        res = ctx.finish(calls=calls)
        res["done_ns"] = done
        return res
    finally:
        if sub is not None:
            conn, th = sub
            th.join(2.0)
            conn.disconnect()
        r.close()


# --- the three legs of a wake-up ------------------------------------------------------------
# Timestamps taken by wrapping redis-py and the hub from outside (dedupe itself is not
# changed): the leader's complete script going out, and each follower's hub reading the
# message. The job's end and the caller's return are stamped by the scenario already.

_legs: dict[str, dict[str, int]] = {"complete": {}, "hub": {}}


def _tag(name: Any) -> str:
    text = name.decode() if isinstance(name, bytes) else str(name)
    lo, hi = text.find("{"), text.find("}")
    tag = text[lo + 1 : hi] if 0 <= lo < hi else text
    return tag.rsplit(":", 1)[-1]  # the job id is "<function>:<key>"; the scenario's key


def install_legs() -> None:
    """Stamp complete-script sends (any redis-py connection) and hub message reads."""
    import redis.connection as sconn

    from dedupe.backend import commands, hub

    if getattr(hub.Hub, "_bench_legs", False):
        return
    sha = commands.COMPLETE.sha.encode()
    complete = _legs["complete"]
    seen = _legs["hub"]
    sync_send: Any = sconn.AbstractConnection.send_packed_command
    writelines: Any = asyncio.StreamWriter.writelines

    def stamp(command: Any) -> None:
        head = counting.head_of(command, 4)  # EVALSHA <sha> <numkeys> <lock key>
        if len(head) == 4 and head[0] == b"EVALSHA" and head[1] == sha:
            complete.setdefault(_tag(head[3]), time.monotonic_ns())

    def send_packed_command(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        stamp(command)
        return sync_send(self, command, *args, **kwargs)

    def stamped_writelines(self: Any, data: Any) -> None:
        # asyncio: redis.asyncio and dedupe's wire both end in the stream's writelines.
        data = list(data)
        if data:
            stamp(data)
        writelines(self, data)

    on_reply = hub.Hub._on_reply

    def _on_reply(self: Any, link: Any, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) >= 3 and reply[0] in (b"message", b"smessage"):
            seen.setdefault(_tag(reply[1]), time.monotonic_ns())
        on_reply(self, link, reply)

    sconn.AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    asyncio.StreamWriter.writelines = stamped_writelines  # type: ignore[method-assign]
    hub.Hub._on_reply = _on_reply  # type: ignore[method-assign]
    hub.Hub._bench_legs = True  # type: ignore[attr-defined]


def legs() -> dict[str, dict[str, int]]:
    """The stamps so far (bench key -> monotonic ns), and clear them."""
    out = {k: dict(v) for k, v in _legs.items()}
    for v in _legs.values():
        v.clear()
    return out
