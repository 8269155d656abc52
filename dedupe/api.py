"""SingleFlight: the decorator, ``call``, ``configure``, and the default instance."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import os
import sys
import threading
import warnings
import weakref
from asyncio import _get_running_loop  # C: the running loop of this thread, or None
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import (
    Any,
    Concatenate,
    Final,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import wrapt

from . import inspector
from .backend import AsyncClient, Backend, BackendConfig, SyncClient
from .commands import forget_call, typed_errors
from .drivers import aio, sync
from .inflight import InFlightInfo, Served
from .inspector import JobState
from .keys import (
    KeyBuilder,
    Names,
    function_name,
    key_builder,
    names_for,
    validate_job_id,
    validate_prefix,
)
from .protocol import FlightSpec
from .sealing import SecretSpec, codec_for, validate_security
from .serializers import Serializer
from .topology import parse_url

__all__ = [
    "INHERIT",
    "AsyncFlightFunction",
    "FlightFunction",
    "Served",
    "Settings",
    "SingleFlight",
    "single_flight",
]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")

DEFAULT_URL: Final = "redis://localhost:6379/0"


class _Inherit:
    """The default of a per-function setting: take the SingleFlight's (also after configure)."""

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT: Final[Any] = _Inherit()
"""Default of the decorator's lock_ttl, wait_timeout and result_ttl: use the instance's."""


# --- validation: one function per setting, used by the constructor and the decorator ----------


def _seconds(name: str, value: object, *, allow_none: bool = False, allow_zero: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, not {value}"
        )
    return float(value)


def _size(name: str, value: object, *, allow_none: bool = False, minimum: int = 0) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


def check_lock_ttl(value: object) -> float:
    lock_ttl: float = _seconds("lock_ttl", value, allow_zero=False)
    if lock_ttl < 0.01:
        raise ValueError(f"lock_ttl must be at least 0.01 s, not {value}")
    return lock_ttl


def check_wait_timeout(value: object) -> float | None:
    wait: float | None = _seconds("wait_timeout", value, allow_none=True)
    return wait


def check_result_ttl(value: object) -> float:
    keep: float = _seconds("result_ttl", value)
    return keep


def check_max_hold(max_hold: object, lock_ttl: float) -> float:
    hold: float = _seconds("max_hold", max_hold, allow_zero=False)
    if hold <= lock_ttl:
        raise ValueError(
            f"max_hold ({hold:g} s) must be longer than lock_ttl ({lock_ttl:g} s): it bounds how "
            "long one leader may keep renewing its lease"
        )
    return hold


def _decodes_responses(client: object) -> bool:
    get_encoder = getattr(client, "get_encoder", None)
    try:
        encoder = get_encoder() if callable(get_encoder) else None
    except Exception:  # a client that cannot say: its first reply will tell
        return False
    return bool(getattr(encoder, "decode_responses", False))


def _check_client(name: str, client: object) -> None:
    if _decodes_responses(client):
        raise ValueError(
            f"{name} was built with decode_responses=True, but dedupe's records are bytes and "
            "would fail to decode: pass a client built without decode_responses (the "
            "default), or url= and let dedupe build its own"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one SingleFlight (see SingleFlight for each field)."""

    url: str | None = None
    client: SyncClient | None = None
    async_client: AsyncClient | None = None
    prefix: str = "dedupe"
    lock_ttl: float = 10.0
    wait_timeout: float | None = None
    result_ttl: float = 1.0
    serializer: str | Serializer = "safe"
    secret: SecretSpec = None
    inline_max_bytes: int = 32 * 1024
    max_payload_bytes: int | None = 64 * 1024 * 1024
    connect_timeout: float = 2.0
    socket_timeout: float = 5.0
    health_check_interval: float = 5.0
    min_replicas_ack: int = 0
    replica_ack_timeout: float = 1.0
    on_backend_error: str = "raise"
    local_cache: bool = False
    token_ttl: float = 60.0
    max_hold: float = 300.0
    local_cache_max_bytes: int = 32 * 1024 * 1024

    def validated(self) -> Settings:
        """Check every field (the URL is parsed, never connected to); return self."""
        if self.url is not None:
            parse_url(self.url)
        if self.client is not None and not isinstance(
            self.client, (redis.Redis, redis.cluster.RedisCluster)
        ):
            raise TypeError(
                f"client must be a redis.Redis or RedisCluster, not {type(self.client).__name__}"
            )
        if self.async_client is not None and not isinstance(
            self.async_client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)
        ):
            raise TypeError(
                "async_client must be a redis.asyncio.Redis or RedisCluster, "
                f"not {type(self.async_client).__name__}"
            )
        _check_client("client", self.client)
        _check_client("async_client", self.async_client)
        validate_prefix(self.prefix)
        check_lock_ttl(self.lock_ttl)
        check_wait_timeout(self.wait_timeout)
        check_result_ttl(self.result_ttl)
        _seconds("connect_timeout", self.connect_timeout, allow_zero=False)
        _seconds("socket_timeout", self.socket_timeout, allow_zero=False)
        _seconds("health_check_interval", self.health_check_interval, allow_zero=False)
        _size("inline_max_bytes", self.inline_max_bytes)
        _size("max_payload_bytes", self.max_payload_bytes, allow_none=True)
        _size("min_replicas_ack", self.min_replicas_ack)
        if not isinstance(self.local_cache, bool):
            raise TypeError(f"local_cache must be a bool, not {type(self.local_cache).__name__}")
        _size("local_cache_max_bytes", self.local_cache_max_bytes, minimum=1)
        if self.on_backend_error not in ("raise", "local"):
            raise ValueError(
                f"on_backend_error must be 'raise' or 'local', not {self.on_backend_error!r}"
            )
        _seconds("replica_ack_timeout", self.replica_ack_timeout, allow_zero=False)
        if _seconds("token_ttl", self.token_ttl, allow_zero=False) < 0.001:
            raise ValueError(f"token_ttl must be at least 0.001 s, not {self.token_ttl}")
        check_max_hold(self.max_hold, self.lock_ttl)
        validate_security(self.serializer, self.secret)
        return self


@dataclass(frozen=True, slots=True)
class _Overrides:
    lock_ttl: float | None = None
    wait_timeout: float | None = INHERIT
    result_ttl: float | None = None


# --- what the decorator returns -----------------------------------------------------------


class FlightFunction(Protocol[P, R_co]):
    """What ``@sf`` makes of a plain function: the function, plus the handles of its flights.

    ``fn.job_id(*args, **kwargs)`` is the job id a call would use; ``fn.detailed(...)`` runs
    the call and returns ``Served(value, shared, role)``; ``fn.forget(...)`` drops the value
    kept for those arguments and says whether there was one (see SingleFlight.forget).
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...
    def job_id(self, *args: P.args, **kwargs: P.kwargs) -> str: ...
    def detailed(self, *args: P.args, **kwargs: P.kwargs) -> Served: ...
    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool: ...
    @overload
    def __get__(
        self, instance: None, owner: type[Any] | None = None, /
    ) -> FlightFunction[P, R_co]: ...
    @overload
    def __get__(
        self: FlightFunction[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None, /
    ) -> FlightFunction[P2, R]: ...


class AsyncFlightFunction(Protocol[P, R_co]):
    """What ``@sf`` makes of a coroutine function; as FlightFunction, every handle but
    ``job_id`` gives a coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]: ...
    def job_id(self, *args: P.args, **kwargs: P.kwargs) -> str: ...
    def detailed(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, Served]: ...
    def forget(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, bool]: ...
    @overload
    def __get__(
        self, instance: None, owner: type[Any] | None = None, /
    ) -> AsyncFlightFunction[P, R_co]: ...
    @overload
    def __get__(
        self: AsyncFlightFunction[Concatenate[S, P2], R],
        instance: S,
        owner: type[Any] | None = None,
        /,
    ) -> AsyncFlightFunction[P2, R]: ...


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncFlightFunction[P, R]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, fn: Callable[P, R]) -> FlightFunction[P, R]: ...


class _Flown:
    """One decorated function's flight settings; shared by its wrapper and bound wrappers."""

    __slots__ = ("builder", "is_async", "overrides", "sf", "warned")

    def __init__(
        self, sf: SingleFlight, builder: KeyBuilder, overrides: _Overrides, is_async: bool
    ) -> None:
        self.sf, self.builder, self.overrides, self.is_async = sf, builder, overrides, is_async
        self.warned = False  # a sync call blocked a running event loop (warned once)

    def job_id(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return self.builder(_full_args(instance, args), kwargs)

    def run(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        detail: bool,
    ) -> Any:
        job_id = self.job_id(instance, args, kwargs)
        if self.is_async:
            coro = self.sf._run_async(job_id, self.overrides, wrapped, args, kwargs, detail)
            return _named(coro, wrapped)
        if _get_running_loop() is not None and not self.warned:
            self.warned = True
            _warn_blocking(wrapped)
        return self.sf._run_sync(job_id, self.overrides, wrapped, args, kwargs, detail)

    def forget(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        job_id = self.job_id(instance, args, kwargs)
        return self.sf.aforget(job_id) if self.is_async else self.sf.forget(job_id)


class _BoundFlightFunction(wrapt.BoundFunctionWrapper[..., Any]):
    """A decorated method, bound to its instance: the same handles, with self bound."""

    def job_id(self, *args: Any, **kwargs: Any) -> str:
        flown: _Flown = self._self_parent._self_flown
        return flown.job_id(self._self_instance, args, kwargs)

    def detailed(self, *args: Any, **kwargs: Any) -> Any:
        flown: _Flown = self._self_parent._self_flown
        return flown.run(self.__wrapped__, self._self_instance, args, kwargs, True)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        flown: _Flown = self._self_parent._self_flown
        return flown.forget(self._self_instance, args, kwargs)


class _FlightFunction(wrapt.FunctionWrapper[..., Any]):
    """The decorated function: calls run as flights; it pickles by reference, as a plain
    function does (so ProcessPoolExecutor.map and multiprocessing can send it)."""

    __bound_function_wrapper__ = _BoundFlightFunction

    def __init__(self, wrapped: Callable[..., Any], flown: _Flown) -> None:
        super().__init__(wrapped, _wrapper_for(flown, wrapped))
        self._self_flown = flown

    def __reduce_ex__(self, protocol: Any) -> str:
        # A str tells pickle: "the global of this name in the object's module", which it
        # checks is this very object; functions defined in a function cannot be sent.
        name: str = self.__wrapped__.__qualname__
        return name

    def __reduce__(self) -> str:
        return self.__reduce_ex__(2)

    def __copy__(self) -> _FlightFunction:
        return self  # a function, like a plain one: copies are the object itself

    def __deepcopy__(self, memo: dict[int, Any]) -> _FlightFunction:
        return self

    def job_id(self, *args: Any, **kwargs: Any) -> str:
        return self._self_flown.job_id(None, args, kwargs)

    def detailed(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_flown.run(self.__wrapped__, None, args, kwargs, True)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_flown.forget(None, args, kwargs)


def _wrapper_for(flown: _Flown, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        return flown.run(wrapped, instance, args, kwargs, False)

    return wrapper


def _named(coro: Coroutine[Any, Any, R], fn: Callable[..., Any]) -> Coroutine[Any, Any, R]:
    # "coroutine ... was never awaited" then names the user's function, not ours.
    inner: Any = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", None)
    target: Any = coro
    if isinstance(name, str):
        target.__qualname__ = name
        target.__name__ = getattr(inner, "__name__", name)
    return coro


# --- a sync flight in a thread that runs an event loop ---------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_WRAPT_DIR = os.path.dirname(os.path.abspath(wrapt.__file__)) + os.sep
_warned_calls: set[object] = set()  # sf.call's sync functions warned about (their code)
_warned_lock = threading.Lock()  # guards _warned_calls


def _warn_blocking(fn: Callable[..., Any]) -> None:
    """Say, as a RuntimeWarning at the user's call, that a sync flight blocks the running loop."""
    name = function_name(fn)
    short = name.rpartition(".")[2] or name
    # The first frame outside dedupe and wrapt is the user's call.
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(
        (_PACKAGE_DIR, _WRAPT_DIR)
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        f"{name} is a sync function run as a flight from a thread that runs an asyncio event "
        "loop: the call blocks that loop until the flight ends (its own run, or the wait for "
        f"another caller's). Make it an async def function, or call it as "
        f"`await asyncio.to_thread({short}, ...)` (warned once per function)",
        RuntimeWarning,
        stacklevel=level,
    )


def _warn_blocking_once(fn: Callable[..., Any]) -> None:
    """_warn_blocking for sf.call: once per function (its code, so that a lambda made anew
    for each call counts as one)."""
    inner: Any = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    inner = getattr(inner, "__func__", inner)
    key = getattr(inner, "__code__", None) or type(inner)
    with _warned_lock:
        if key in _warned_calls:
            return
        _warned_calls.add(key)
    _warn_blocking(fn)


def _full_args(instance: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # wrapt hands a method's self (or a classmethod's cls) apart; the key binds it too.
    return args if instance is None else (instance, *args)


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    return inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


# --- the instance -------------------------------------------------------------------------


_instances: weakref.WeakSet[SingleFlight] = weakref.WeakSet()  # for the fork handler below


class SingleFlight:
    """Runs a function once across every concurrent caller that shares a Redis.

    Use it as a decorator (``@sf``, ``@sf(key="user:{user_id}")``) or ad hoc
    (``sf.call("job-id", fn, *args)``). Sync functions block the caller (in a thread that
    runs an event loop, the loop: a RuntimeWarning says so, once per function); coroutine
    functions stay coroutine functions. Nothing connects until the first call; every
    argument is checked here (the URL is parsed, not dialled).

    Parameters (all but ``url`` keyword-only; times in seconds):

    - ``url``: ``redis://host:port/db``, ``rediss://``, ``unix://path``,
      ``redis+cluster://h:p[,h:p]``, ``redis+sentinel://h:p[,h:p]/service[/db]``. Default:
      ``DEDUPE_REDIS_URL``, else ``redis://localhost:6379/0``.
    - ``client`` / ``async_client``: your own ``redis.Redis`` / ``RedisCluster`` (or a
      Sentinel ``master_for``) and asyncio twins; give either or both, the other is derived.
      Not built with ``decode_responses=True``.
    - ``prefix``: namespace of every Redis key and channel (no braces). ``"dedupe"``.
    - ``lock_ttl``: the lease (>= 0.01), renewed every lock_ttl/3 while the leader runs;
      bounds the takeover after a crash. ``10.0``.
    - ``wait_timeout``: most a follower waits before ``WaitTimeout``; ``None``: as long as a
      live leader holds the lease. ``None``.
    - ``result_ttl``: how long a value stays readable for callers that arrive just after its
      flight; ``0`` keeps nothing. ``1.0``.
    - ``max_hold``: the longest one leader keeps renewing its lease (> lock_ttl); after it
      the lease counts as lost and a waiter may take over. ``300.0``.
    - ``token_ttl``: how long a key's fencing-token counter outlives its last lease. ``60.0``.
    - ``serializer``: ``"safe"`` (JSON types plus bytes, tuple, set/frozenset, date/time,
      timedelta, Decimal, UUID, any hashable dict keys; each comes back as itself, and reading
      it runs no code), ``"json"`` (plain, lossy), ``"pickle"`` (any picklable value; needs a
      secret), ``"pickle-unsafe"`` (pickle without a secret: whoever can write to the Redis,
      or only PUBLISH, runs code in this process), or an object with ``ident``, ``dumps``,
      ``loads``. ``"safe"``.
    - ``secret``: HMAC key(s) signing every record and notice, as str, bytes or a sequence
      of them: the first signs, all verify (rotation). Default: ``DEDUPE_SECRET``, which may
      hold several keys separated by commas. ``None``: unsigned.
    - ``inline_max_bytes``: outcomes up to this size travel on the channel. ``32768``.
    - ``max_payload_bytes``: larger outcomes are not shipped (``ResultTooLarge``). 64 MiB.
    - ``connect_timeout`` / ``socket_timeout``: bounds on each Redis operation of the
      clients dedupe builds. ``2.0`` / ``5.0``.
    - ``health_check_interval``: idle pub/sub connections are PINGed this often. ``5.0``.
    - ``min_replicas_ack`` / ``replica_ack_timeout``: after acquiring, ``WAIT`` for this many
      replicas, else ``BackendUnavailable``. ``0`` / ``1.0``.
    - ``on_backend_error``: ``"raise"`` (``BackendUnavailable``) or ``"local"`` (in-process
      deduplication while Redis is unreachable; configuration errors still raise).
    - ``local_cache``: keep each kept value in the process too, while Redis keeps it fresh.
      ``False``. ``local_cache_max_bytes`` bounds those copies (estimated size). 32 MiB.

    Raises TypeError or ValueError naming the argument that is wrong.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: SyncClient | None = None,
        async_client: AsyncClient | None = None,
        prefix: str = "dedupe",
        lock_ttl: float = 10.0,
        wait_timeout: float | None = None,
        result_ttl: float = 1.0,
        serializer: str | Serializer = "safe",
        secret: SecretSpec = None,
        inline_max_bytes: int = 32 * 1024,
        max_payload_bytes: int | None = 64 * 1024 * 1024,
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        health_check_interval: float = 5.0,
        min_replicas_ack: int = 0,
        replica_ack_timeout: float = 1.0,
        on_backend_error: str = "raise",
        local_cache: bool = False,
        token_ttl: float = 60.0,
        max_hold: float = 300.0,
        local_cache_max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self._lock = threading.Lock()  # guards _backend and _settings swaps
        _instances.add(self)
        self._settings = Settings(
            url=url,
            client=client,
            async_client=async_client,
            prefix=prefix,
            lock_ttl=lock_ttl,
            wait_timeout=wait_timeout,
            result_ttl=result_ttl,
            serializer=serializer,
            secret=secret,
            inline_max_bytes=inline_max_bytes,
            max_payload_bytes=max_payload_bytes,
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
            health_check_interval=health_check_interval,
            min_replicas_ack=min_replicas_ack,
            replica_ack_timeout=replica_ack_timeout,
            on_backend_error=on_backend_error,
            local_cache=local_cache,
            token_ttl=token_ttl,
            max_hold=max_hold,
            local_cache_max_bytes=local_cache_max_bytes,
        ).validated()
        self._backend: Backend | None = None
        self._params: dict[_Overrides, tuple[Settings, tuple[int, ...]]] = {}

    # --- configuration ------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    def configure(self, **changes: Any) -> None:
        """Change settings (the names of __init__'s parameters); functions decorated earlier
        follow. Configure before heavy use: calls already running finish on the old ones."""
        unknown = set(changes) - set(Settings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"configure() got unknown settings: {', '.join(sorted(unknown))}")
        settings = replace(self._settings, **changes).validated()
        with self._lock:
            old, self._backend = self._backend, None
            self._settings = settings
        if old is not None:
            old.retire()  # running flights finish on it, leases renewed; then it closes

    def close(self, timeout: float | None = None) -> None:
        """Stop the hub and renewal threads and close the clients this instance created.

        Flights still running get up to ``timeout`` seconds (default: lock_ttl) to finish;
        leases held after that stop being renewed, so their leaders learn they lost them
        (``current_flight().lease_lost``) and a waiter elsewhere takes over. The instance
        stays usable: the next call builds its Redis plumbing anew.
        """
        with self._lock:
            old, self._backend = self._backend, None
        if old is not None:
            old.close(timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """close(), and also close this event loop's asyncio client (call it before the loop
        ends, e.g. at the end of the coroutine that ``asyncio.run()`` runs)."""
        with self._lock:
            old, self._backend = self._backend, None
        if old is not None:
            await old.aclose_loop_client()
            await asyncio.to_thread(old.close, timeout)

    def stats(self) -> dict[str, int]:
        """Counters: envelopes rejected, hub reconnects, leases lost, local runs, flights now."""
        return self.backend().stats()

    def backend(self) -> Backend:
        """The Redis plumbing of this instance, built on first use."""
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._new_backend(self._settings)
                backend = self._backend
        return backend

    @staticmethod
    def _new_backend(s: Settings) -> Backend:
        codec = codec_for(s.serializer, s.secret, s.max_payload_bytes)
        url = s.url or os.environ.get("DEDUPE_REDIS_URL") or DEFAULT_URL
        if s.url is None and s.client is None and s.async_client is None:
            try:
                parse_url(url)
            except ValueError as exc:
                raise ValueError(f"DEDUPE_REDIS_URL: {exc}") from None
        return Backend(
            BackendConfig(
                url=url,
                client=s.client,
                async_client=s.async_client,
                connect_timeout=s.connect_timeout,
                socket_timeout=s.socket_timeout,
                health_check_interval=s.health_check_interval,
                codec=codec,
                on_backend_error=s.on_backend_error,
                local_cache=s.local_cache,
                lock_ttl=s.lock_ttl,
                local_cache_max_bytes=s.local_cache_max_bytes,
                name=s.prefix,
            )
        )

    def _spec_maker(
        self, backend: Backend, names: Names, o: _Overrides
    ) -> Callable[[float | None], FlightSpec]:
        lock_ms, keep_ms, inline, replicas, replica_ms, token_ms, hold_ms = self._flight_params(o)

        def make(deadline: float | None) -> FlightSpec:
            return FlightSpec(
                names=names,
                owner=backend.owner(),
                lock_ttl_ms=lock_ms,
                token_ttl_ms=token_ms,
                keep_ms=keep_ms,
                grace_ms=lock_ms + 2000,
                inline_max_bytes=inline,
                deadline=deadline,
                min_replicas=replicas,
                replica_timeout_ms=replica_ms,
                max_hold_ms=hold_ms,
            )

        return make

    def _flight_params(self, o: _Overrides) -> tuple[int, ...]:
        """A function's flight parameters, worked out once per settings and overrides."""
        s = self._settings
        cached = self._params.get(o)
        if cached is None or cached[0] is not s:
            lock = o.lock_ttl if o.lock_ttl is not None else s.lock_ttl
            keep = o.result_ttl if o.result_ttl is not None else s.result_ttl
            params = (
                max(10, round(lock * 1000)),
                round(keep * 1000),
                s.inline_max_bytes,
                s.min_replicas_ack,
                round(s.replica_ack_timeout * 1000),
                max(1, round(s.token_ttl * 1000)),
                # A lease is never cut shorter than one lock_ttl, even if configure() made
                # max_hold shorter than a function's own lock_ttl.
                max(round(s.max_hold * 1000), round(lock * 1000) + 1),
            )
            self._params[o] = cached = (s, params)
        return cached[1]

    def _wait_timeout(self, o: _Overrides) -> float | None:
        return self._settings.wait_timeout if o.wait_timeout is INHERIT else o.wait_timeout

    # --- running ------------------------------------------------------------------------------

    def _run_sync(
        self,
        job_id: str,
        o: _Overrides,
        fn: Callable[..., R],
        args: Any,
        kw: Any,
        detail: bool = False,
    ) -> Any:
        backend = self.backend()
        names = names_for(self._settings.prefix, job_id)
        make = self._spec_maker(backend, names, o)
        wait = self._wait_timeout(o)
        return sync.call(backend, names, make, wait, fn, args, kw, detail=detail)

    async def _run_async(
        self,
        job_id: str,
        o: _Overrides,
        fn: Callable[..., Awaitable[R]],
        args: Any,
        kw: Any,
        detail: bool = False,
    ) -> Any:
        backend = self.backend()
        names = names_for(self._settings.prefix, job_id)
        make = self._spec_maker(backend, names, o)
        wait = self._wait_timeout(o)
        return await aio.call(backend, names, make, wait, fn, args, kw, detail=detail)  # type: ignore[arg-type]

    @overload
    def call(
        self,
        job_id: str,
        fn: Callable[P, Coroutine[Any, Any, R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Coroutine[Any, Any, R]: ...
    @overload
    def call(self, job_id: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    def call(self, job_id: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for every concurrent caller of ``job_id``.

        ``job_id`` is global: any call (or ``namespace=False`` decorator key) with the same
        id under the same prefix shares the flight. A coroutine function gives a coroutine
        to await; a plain function runs now.
        """
        return self._call(job_id, fn, args, kwargs, False)

    @overload
    def call_detailed(
        self,
        job_id: str,
        fn: Callable[P, Coroutine[Any, Any, Any]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Coroutine[Any, Any, Served]: ...
    @overload
    def call_detailed(
        self, job_id: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> Served: ...
    def call_detailed(
        self, job_id: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """As ``call``, but return ``Served(value, shared, role)``: ``shared`` is False only
        for the caller that ran ``fn``; ``role`` is "leader", "local" (joined a call in this
        process), "remote" (another process's leader) or "kept" (a finished flight's value)."""
        return self._call(job_id, fn, args, kwargs, True)

    def _call(
        self,
        job_id: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        detail: bool,
    ) -> Any:
        validate_job_id(job_id)
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if _is_async(fn):
            return _named(self._run_async(job_id, _Overrides(), fn, args, kwargs, detail), fn)
        if _get_running_loop() is not None:
            _warn_blocking_once(fn)
        return self._run_sync(job_id, _Overrides(), fn, args, kwargs, detail)

    def inflight(self) -> list[InFlightInfo]:
        """The flights of this process now: job id, leading or following, local waiters, age."""
        return self.backend().inflight()

    def inspect(self, job_id: str) -> JobState:
        """What Redis holds for ``job_id`` now: holder (host, pid, lease start), fencing
        token, lease time left, the kept outcome and its age, subscribers across nodes. Reads
        only; see dedupe.inspector.JobState."""
        validate_job_id(job_id)
        with typed_errors():
            return inspector.inspect(self.backend().sync_client(), self._settings.prefix, job_id)

    def forget(self, job_id: str) -> bool:
        """Drop the value kept for ``job_id`` (in Redis, and this process's local copy), so
        the next call runs the function: call it after a write that makes the value stale.

        Returns True if a kept value was dropped: one Redis would still have served to new
        callers, or a fresh local copy (``local_cache``); False if there was none. A flight
        running now still completes and keeps its value as usual. Decorated functions have
        ``fn.forget(*args, **kwargs)``; raises BackendUnavailable or ConfigurationError as a
        call would."""
        names, backend, dropped = self._forgetting(job_id)
        with typed_errors():
            kept = backend.run_sync_script(forget_call(names))
        return bool(kept) or dropped

    async def aforget(self, job_id: str) -> bool:
        """``forget`` for asyncio code: the same, over the asyncio client."""
        names, backend, dropped = self._forgetting(job_id)
        with typed_errors():
            kept = await backend.run_async_script(forget_call(names))
        return bool(kept) or dropped

    def _forgetting(self, job_id: str) -> tuple[Names, Backend, bool]:
        names = names_for(self._settings.prefix, validate_job_id(job_id))
        backend = self.backend()
        copies = backend.local_copies
        dropped = copies is not None and copies.discard(names.channel)
        return names, backend, dropped

    # --- decorating ---------------------------------------------------------------------------

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> AsyncFlightFunction[P, R]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, fn: Callable[P, R], /) -> FlightFunction[P, R]: ...
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self,
        fn: Callable[P, Coroutine[Any, Any, R]],
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
    ) -> AsyncFlightFunction[P, R]: ...
    @overload
    def __call__(
        self,
        fn: Callable[P, R],
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
    ) -> FlightFunction[P, R]: ...
    @overload
    def __call__(
        self,
        fn: None = None,
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
    ) -> _Decorator: ...
    def __call__(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
    ) -> Any:
        """Decorate ``fn`` (``@sf``, or ``sf(fn, key=...)``) or return a decorator
        (``@sf(key=...)``).

        - ``key``: None (a digest of the arguments and of what ``fn`` captures; the
          arguments must be plain values, see README), a ``str.format`` template over the
          bound arguments (``"user:{user_id}"``, ``"{self.id}"``), or a callable taking the
          arguments it names and returning a str.
        - ``namespace``: job ids are ``<module.qualname>:<key>`` (True), ``<str>:<key>`` (a
          str of your own, e.g. to keep ids across a rename), or the key alone (False: shared
          with every function and ``call()`` using the same id).
        - ``lock_ttl``, ``wait_timeout``, ``result_ttl``: this function's own values
          (INHERIT: the instance's, also after ``configure``); checked as the constructor
          checks them.

        The result keeps ``fn``'s signature and adds ``.job_id(...)``, ``.detailed(...)`` and
        ``.forget(...)``; it pickles by reference, like the function.
        """
        overrides = _Overrides(
            lock_ttl=None if lock_ttl is INHERIT or lock_ttl is None else check_lock_ttl(lock_ttl),
            wait_timeout=INHERIT if wait_timeout is INHERIT else check_wait_timeout(wait_timeout),
            result_ttl=None
            if result_ttl is INHERIT or result_ttl is None
            else check_result_ttl(result_ttl),
        )
        if overrides.lock_ttl is not None and overrides.lock_ttl >= self._settings.max_hold:
            check_max_hold(self._settings.max_hold, overrides.lock_ttl)
        if fn is not None:
            return self._decorate(fn, key, namespace, overrides)
        return functools.partial(self._decorate, key=key, namespace=namespace, overrides=overrides)

    def _decorate(
        self,
        fn: Callable[..., Any],
        key: str | Callable[..., str] | None,
        namespace: bool | str,
        overrides: _Overrides,
    ) -> Any:
        if not callable(fn):
            raise TypeError(f"single_flight decorates callables, not {type(fn).__name__}")
        builder = key_builder(fn, key, namespace)
        return _FlightFunction(fn, _Flown(self, builder, overrides, _is_async(fn)))

    def __repr__(self) -> str:
        s = self._settings
        where = "client" if s.client or s.async_client else (s.url or "DEDUPE_REDIS_URL")
        return f"SingleFlight({where}, prefix={s.prefix!r}, lock_ttl={s.lock_ttl})"


single_flight: Final = SingleFlight()
"""The default instance: Redis from DEDUPE_REDIS_URL, else redis://localhost:6379/0, lazily."""


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays held in the child for good: give
    # every instance a fresh one there (its backend re-creates its own state, backend.py).
    for sf in list(_instances):
        sf._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
