"""Fork- and loop-safe: a child forked while other threads hold dedupe's locks starts with
fresh ones and its own tables, renewer and connections, and follows the parent's leases
through Redis; each event loop has its own flights and client, and a loop that stops
mid-flight strands only its own callers.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from helpers import _hold, _sf, _take_over, gather, until

from dedupe import SingleFlight
from dedupe.backend.renewal import Renewer, renew_many
from dedupe.core import leases
from dedupe.core.leases import Lease, LostSignal
from devtools.servers import RedisServer

# --------------------------------------------------------------------------- fork


@pytest.mark.timeout(60)
def test_fork_while_locks_are_held_and_a_flight_runs(redis_url: str, prefix: str) -> None:
    """A child forked while another thread holds the instance's lock and a flight leads
    works on its own: no lock inherited locked, its own tables, the parent's lease followed."""
    sf = SingleFlight(redis_url, prefix=prefix, lock_ttl=1.0, result_ttl=10)
    holding, release_lock = threading.Event(), threading.Event()
    running, release_job = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with sf._lock:
            holding.set()
            release_lock.wait(20)

    def job() -> str:
        running.set()
        assert release_job.wait(20)
        return "parent"

    th = threading.Thread(target=hold_lock)
    tj = threading.Thread(target=lambda: sf.call("k1", job))
    try:
        sf.call("warm", lambda: 0)  # the backend exists before the fork
        th.start()
        tj.start()
        assert holding.wait(10) and running.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if both calls come back right
            code = 1
            try:
                sf.configure(result_ttl=10)  # takes the lock another thread held at fork
                ok = sf.call("k2", lambda: "child") == "child"
                ok = ok and sf.call("k1", lambda: "child-ran-it") == "parent"
                code = 0 if ok else 2
            finally:
                os._exit(code)
        release_lock.set()
        release_job.set()
        deadline = 30
        status = 0
        for _ in range(deadline * 100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release_lock.set()
        release_job.set()
        th.join(10)
        tj.join(10)
        sf.close(timeout=0)


def _child(port: int, prefix: str, parent_renewer: Renewer) -> int:
    """In the forked child: the parent's renewer and signals must be usable, a new renewer
    must renew. Returns the exit code."""
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    assert parent_renewer.pending() == 0  # the parent's leases are the parent's to renew
    LostSignal().event()  # takes the signals' lock
    key = f"{prefix}:child"
    lease = _hold(client, key, 0.3)
    renewer = Renewer(lambda items: renew_many(client, items))
    renewer.add(lease)
    end = time.monotonic() + 10
    while renewer.stats()["renewed"] < 2:
        if time.monotonic() > end:
            return 3
        time.sleep(0.01)
    lease.lost.set()
    renewer.close()
    return 0 if lease.lost.event().is_set() else 4


@pytest.mark.timeout(30)
def test_fork_while_leases_are_held_and_locks_are_taken(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    prefix: str,
    renewers: Callable[..., Renewer],
) -> None:
    renewer = renewers(lambda items: renew_many(redis_client, items))
    lease = _hold(redis_client, f"{prefix}:parent", 2.0)
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal in the parent")
    # Another thread holds the signals' lock and the renewer's lock at the moment of fork.
    held, release = threading.Event(), threading.Event()

    def hold_locks() -> None:
        with leases._guard, renewer._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_locks)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            code = _child(redis_server.port, prefix, renewer)
        finally:
            os._exit(code)
    release.set()
    holder.join(5)
    status = None
    end = time.monotonic() + 20
    while status is None and time.monotonic() < end:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        else:
            time.sleep(0.02)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child deadlocked")
    assert os.waitstatus_to_exitcode(status) == 0
    assert not lease.lost.is_set()  # the parent's lease was renewed all along


def _forked_child(url: str, prefix: str, out: Any) -> None:
    out.put(_FORK_SF.call("after-fork", os.getpid))


_FORK_SF: SingleFlight


@pytest.mark.timeout(60)
def test_works_in_processes_forked_after_first_use(redis_url: str, prefix: str) -> None:
    global _FORK_SF
    _FORK_SF = SingleFlight(redis_url, prefix=prefix, result_ttl=0)
    # First use in the parent starts its hub and renewer threads and opens its sockets.
    assert _FORK_SF.call("before-fork", os.getpid) == os.getpid()
    fork = mp.get_context("fork")
    out = fork.Queue()
    children = [fork.Process(target=_forked_child, args=(redis_url, prefix, out)) for _ in range(3)]
    for c in children:
        c.start()
    pids = gather(out, 3, timeout=30)
    for c in children:
        c.join(10)
    assert all(c.exitcode == 0 for c in children)
    assert set(pids) <= {c.pid for c in children}
    # The parent still works after its children used their own copies.
    assert _FORK_SF.call("parent-again", os.getpid) == os.getpid()
    _FORK_SF.close()


@pytest.mark.timeout(60)
@pytest.mark.compat
def test_a_forked_child_never_writes_on_the_parents_connections(
    redis_url: str, prefix: str
) -> None:
    """The child inherits the parent's open command connections (same sockets). Both run
    flights at once; were the child to reuse one, requests and replies would cross, and a
    flight would lead with a token that is not the one its lock holds."""
    import os
    import signal

    from dedupe import current_flight
    from dedupe.core.keys import names_for

    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=0)
    for i in range(20):  # the idle connections exist before the fork
        assert sf.call(f"warm{i}", lambda i=i: i) == i

    def run(side: str) -> bool:
        check = redis.Redis.from_url(redis_url)  # opened after the fork, by each side
        try:
            for i in range(300):
                key = f"{side}{i}"

                def job(key: str = key) -> bool:
                    flight = current_flight()
                    assert flight is not None
                    lock = check.get(names_for(prefix, key).lock) or b""
                    return lock.split(b":", 1)[0] == str(flight.token).encode()

                if sf.call(key, job) is not True:
                    return False
            return True
        finally:
            check.close()

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if run("child") else 2
        finally:
            os._exit(code)
    try:
        assert run("parent")
        for _ in range(3000):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        sf.close(timeout=0)


# --------------------------------------------------------------------------- event loops


@pytest.mark.timeout(60)
def test_two_event_loops_one_stopped_mid_flight(
    redis_url: str, prefix: str, sfs: list[Any]
) -> None:
    """Callers of one key on two loops: loop 1 leads and then stops for good mid-flight;
    loop 2's callers are not stranded behind it (they take over once its lease lapses)."""
    sf = _sf(sfs, redis_url, prefix, lock_ttl=0.5, max_hold=1.0)
    started = threading.Event()

    async def stuck() -> str:
        started.set()
        await asyncio.Event().wait()  # never set: its loop stops under it
        return "never"

    loop1 = asyncio.new_event_loop()
    tasks: list[Any] = []

    def run_loop1() -> None:
        asyncio.set_event_loop(loop1)
        tasks.append(loop1.create_task(sf.call("two-loops", stuck)))
        loop1.run_forever()

    t1 = threading.Thread(target=run_loop1, daemon=True)
    t1.start()
    assert started.wait(10)
    loop1.call_soon_threadsafe(loop1.stop)
    t1.join(10)

    async def fine() -> str:
        return "loop2"

    async def main() -> list[str]:
        try:
            return list(await asyncio.gather(*(sf.call("two-loops", fine) for _ in range(5))))
        finally:
            await sf.aclose()

    assert asyncio.run(main()) == ["loop2"] * 5
    loop1.close()


@pytest.mark.timeout(40)
def test_lease_of_a_closed_event_loop_is_abandoned(
    redis_client: redis.Redis, prefix: str, renewers: Callable[..., Renewer]
) -> None:
    key = f"{prefix}:lock"
    loop = asyncio.new_event_loop()
    sent = time.monotonic()
    assert redis_client.set(key, "1:me", px=1000)
    lease = Lease(key, key, "1:me", 1.0, acquired_at=sent, max_hold=None, loop=loop)
    renewer = renewers(lambda items: renew_many(redis_client, items))
    renewer.add(lease)
    until(lambda: renewer.stats()["renewed"] >= 1, 5, "a renewal")
    loop.close()  # the leader's loop is gone, and with it whoever would remove the lease
    _take_over(redis_client, key, 5)
    until(lambda: renewer.stats()["abandoned"] == 1, 5, "the lease to be dropped")
    assert renewer.pending() == 0


@pytest.mark.timeout(60)
@pytest.mark.compat
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_event_loops_and_threads_at_once_never_share_a_connection(
    redis_url: str, prefix: str
) -> None:
    """Two event loops (each its own connections) and sync threads (the process's) run
    flights on one instance at once; every leader's token is the one its lock holds. A
    flight's task left when its loop closes ends there: no "coroutine ignored
    GeneratorExit" (it once awaited on after it)."""
    from dedupe import current_flight
    from dedupe.core.keys import names_for

    sf = SingleFlight(redis_url, prefix=prefix, result_ttl=0)
    check = redis.Redis.from_url(redis_url)
    bad: list[str] = []

    def verify(key: str) -> None:
        flight = current_flight()
        assert flight is not None
        lock = check.get(names_for(prefix, key).lock) or b""
        if lock.split(b":", 1)[0] != str(flight.token).encode():
            bad.append(key)

    def loop_side(side: str) -> None:
        async def job(key: str) -> str:
            verify(key)
            return key

        async def main() -> None:
            try:
                keys = [f"{side}:{i}" for i in range(150)]
                for start in range(0, len(keys), 30):
                    batch = keys[start : start + 30]
                    assert await asyncio.gather(*(sf.call(k, job, k) for k in batch)) == batch
            finally:
                await sf.aclose()

        asyncio.run(main())

    def thread_side(side: str) -> None:
        for i in range(100):
            key = f"{side}:{i}"
            assert sf.call(key, lambda key=key: verify(key) or key) == key

    errors: list[BaseException] = []

    def guarded(fn: Any, side: str) -> None:
        try:
            fn(side)
        except BaseException as exc:
            errors.append(exc)

    sides = [(loop_side, "loopA"), (loop_side, "loopB"), (thread_side, "t1"), (thread_side, "t2")]
    threads = [threading.Thread(target=guarded, args=s) for s in sides]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
    finally:
        sf.close(timeout=0)
        check.close()
    assert errors == [] and bad == []


# --------------------------------------------------------------------------- random draws


def _draw_in_child(q: Any) -> None:
    from dedupe.backend import hub
    from dedupe.core import protocol

    q.put((protocol._random(), hub._jitter.random()))


@pytest.mark.timeout(60)
def test_dedupe_leaves_the_global_random_sequence_alone_and_forks_draw_their_own() -> None:
    from dedupe.backend import hub
    from dedupe.core import protocol

    # early_refresh draws on every call of a kept key: the app's seeded sequence must not move.
    sf = SingleFlight("memory://random-draws", result_ttl=60, early_refresh=1.0)
    try:
        random = __import__("random")
        random.seed(7)
        expected = [random.random() for _ in range(3)]
        random.seed(7)
        for _ in range(20):
            assert sf.call("drawn", lambda: 1) == 1
        assert [random.random() for _ in range(3)] == expected
    finally:
        sf.close()
    # A forked child reseeds dedupe's generators, as Python reseeds the global one: forked
    # workers neither refresh early nor reconnect in step.
    q = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=_draw_in_child, args=(q,))
    child.start()
    try:
        theirs = q.get(timeout=30)
    finally:
        child.join(30)
    assert theirs[0] != protocol._random()
    assert theirs[1] != hub._jitter.random()
