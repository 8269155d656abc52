"""SingleFlight: the decorator, ``call``, ``configure``, and the default instance."""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast, overload

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import wrapt

from .backend import AsyncClient, Backend, BackendConfig, SyncClient
from .drivers import aio, sync
from .envelope import Codec, Serializer, resolve_serializer
from .keys import KeyBuilder, Names, key_builder, names_for, validate_job_id, validate_prefix
from .protocol import FlightSpec

__all__ = ["SingleFlight", "single_flight"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL: Final = "redis://localhost:6379/0"
_TOKEN_TTL_MS: Final = 24 * 3600 * 1000
_UNSET: Any = object()


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


def _size(name: str, value: object, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one SingleFlight."""

    url: str | None = None
    client: SyncClient | None = None
    async_client: AsyncClient | None = None
    prefix: str = "dedupe"
    lock_ttl: float = 10.0
    wait_timeout: float | None = None
    result_ttl: float = 1.0
    serializer: str | Serializer = "pickle"
    secret: str | bytes | None = None
    inline_max_bytes: int = 32 * 1024
    max_payload_bytes: int | None = 64 * 1024 * 1024
    connect_timeout: float = 2.0
    socket_timeout: float = 5.0
    health_check_interval: float = 5.0
    min_replicas_ack: int = 0
    replica_ack_timeout: float = 1.0
    on_backend_error: str = "raise"
    local_cache: bool = False

    def validated(self) -> Settings:
        if self.url is not None and not isinstance(self.url, str):
            raise TypeError(f"url must be a str, not {type(self.url).__name__}")
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
        validate_prefix(self.prefix)
        _seconds("lock_ttl", self.lock_ttl, allow_zero=False)
        if self.lock_ttl < 0.01:
            raise ValueError(f"lock_ttl must be at least 0.01 s, not {self.lock_ttl}")
        _seconds("wait_timeout", self.wait_timeout, allow_none=True)
        _seconds("result_ttl", self.result_ttl)
        _seconds("connect_timeout", self.connect_timeout, allow_zero=False)
        _seconds("socket_timeout", self.socket_timeout, allow_zero=False)
        _seconds("health_check_interval", self.health_check_interval, allow_zero=False)
        _size("inline_max_bytes", self.inline_max_bytes)
        _size("max_payload_bytes", self.max_payload_bytes, allow_none=True)
        _size("min_replicas_ack", self.min_replicas_ack)
        if not isinstance(self.local_cache, bool):
            raise TypeError(f"local_cache must be a bool, not {type(self.local_cache).__name__}")
        if self.on_backend_error not in ("raise", "local"):
            raise ValueError(
                f"on_backend_error must be 'raise' or 'local', not {self.on_backend_error!r}"
            )
        _seconds("replica_ack_timeout", self.replica_ack_timeout, allow_zero=False)
        resolve_serializer(self.serializer)
        if self.secret is not None and not isinstance(self.secret, (str, bytes)):
            raise TypeError(f"secret must be str or bytes, not {type(self.secret).__name__}")
        if self.secret is not None and len(self.secret) == 0:
            raise ValueError("secret must not be empty")
        return self


@dataclass(frozen=True, slots=True)
class _Overrides:
    lock_ttl: float | None = None
    wait_timeout: float | None = _UNSET
    result_ttl: float | None = None


class _Decorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...


class SingleFlight:
    """Runs a function once across every concurrent caller that shares a Redis.

    Use it as a decorator (``@sf``, ``@sf(key="user:{user_id}")``) or ad hoc
    (``sf.call("job-id", fn, *args)``). Sync functions block the caller; coroutine
    functions stay coroutine functions.
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
        serializer: str | Serializer = "pickle",
        secret: str | bytes | None = None,
        inline_max_bytes: int = 32 * 1024,
        max_payload_bytes: int | None = 64 * 1024 * 1024,
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        health_check_interval: float = 5.0,
        min_replicas_ack: int = 0,
        replica_ack_timeout: float = 1.0,
        on_backend_error: str = "raise",
        local_cache: bool = False,
    ) -> None:
        self._lock = threading.Lock()
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
        ).validated()
        self._backend: Backend | None = None
        self._params: dict[_Overrides, tuple[Settings, tuple[int, int, int, int, int]]] = {}

    # --- configuration ------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    def configure(self, **changes: Any) -> None:
        """Change settings; functions decorated earlier follow. Configure before heavy use."""
        unknown = set(changes) - set(Settings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"configure() got unknown settings: {', '.join(sorted(unknown))}")
        settings = replace(self._settings, **changes).validated()
        with self._lock:
            old, self._backend = self._backend, None
            self._settings = settings
        if old is not None:
            old.close()

    def close(self) -> None:
        """Stop the hub and renewal threads and close the clients this instance created."""
        with self._lock:
            old, self._backend = self._backend, None
        if old is not None:
            old.close()

    def stats(self) -> dict[str, int]:
        """Counters: envelopes rejected, hub reconnects, leases lost, local runs, flights now."""
        return self.backend().stats()

    def backend(self) -> Backend:
        backend = self._backend
        if backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._new_backend(self._settings)
                backend = self._backend
        return backend

    @staticmethod
    def _new_backend(s: Settings) -> Backend:
        secret = os.environ.get("DEDUPE_SECRET") if s.secret is None else s.secret
        codec = Codec(
            resolve_serializer(s.serializer),
            secret.encode() if isinstance(secret, str) and secret else secret or None,
            s.max_payload_bytes,
        )
        url = s.url or os.environ.get("DEDUPE_REDIS_URL") or DEFAULT_URL
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
            )
        )

    def _spec_maker(
        self, backend: Backend, names: Names, o: _Overrides
    ) -> Callable[[float | None], FlightSpec]:
        lock_ms, keep_ms, inline, replicas, replica_ms = self._flight_params(o)

        def make(deadline: float | None) -> FlightSpec:
            return FlightSpec(
                names=names,
                owner=backend.owner(),
                lock_ttl_ms=lock_ms,
                token_ttl_ms=_TOKEN_TTL_MS,
                keep_ms=keep_ms,
                grace_ms=lock_ms + 2000,
                inline_max_bytes=inline,
                deadline=deadline,
                min_replicas=replicas,
                replica_timeout_ms=replica_ms,
            )

        return make

    def _flight_params(self, o: _Overrides) -> tuple[int, int, int, int, int]:
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
            )
            self._params[o] = cached = (s, params)
        return cached[1]

    def _wait_timeout(self, o: _Overrides) -> float | None:
        return self._settings.wait_timeout if o.wait_timeout is _UNSET else o.wait_timeout

    # --- running ------------------------------------------------------------------------------

    def _run_sync(self, job_id: str, o: _Overrides, fn: Callable[..., R], args: Any, kw: Any) -> R:
        backend = self.backend()
        names = names_for(self._settings.prefix, job_id)
        make = self._spec_maker(backend, names, o)
        wait = self._wait_timeout(o)
        return cast(R, sync.call(backend, names, make, wait, fn, args, kw))

    async def _run_async(
        self, job_id: str, o: _Overrides, fn: Callable[..., Awaitable[R]], args: Any, kw: Any
    ) -> R:
        backend = self.backend()
        names = names_for(self._settings.prefix, job_id)
        make = self._spec_maker(backend, names, o)
        wait = self._wait_timeout(o)
        result = await aio.call(backend, names, make, wait, fn, args, kw)  # type: ignore[arg-type]
        return cast(R, result)

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

        A coroutine function gives a coroutine to await; a plain function runs now.
        """
        validate_job_id(job_id)
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if _is_async(fn):
            return self._run_async(job_id, _Overrides(), fn, args, kwargs)
        return self._run_sync(job_id, _Overrides(), fn, args, kwargs)

    # --- decorating ---------------------------------------------------------------------------

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]: ...
    @overload
    def __call__(
        self,
        fn: None = None,
        /,
        *,
        key: str | Callable[..., str] | None = None,
        lock_ttl: float | None = None,
        wait_timeout: float | None = _UNSET,
        result_ttl: float | None = None,
    ) -> _Decorator: ...
    def __call__(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: str | Callable[..., str] | None = None,
        lock_ttl: float | None = None,
        wait_timeout: float | None = _UNSET,
        result_ttl: float | None = None,
    ) -> Any:
        """Decorate ``fn`` (bare ``@sf``) or return a decorator (``@sf(key=...)``)."""
        overrides = _Overrides(
            lock_ttl=None if lock_ttl is None else _seconds("lock_ttl", lock_ttl, allow_zero=False),
            wait_timeout=wait_timeout
            if wait_timeout is _UNSET
            else _seconds("wait_timeout", wait_timeout, allow_none=True),
            result_ttl=None if result_ttl is None else _seconds("result_ttl", result_ttl),
        )
        if fn is not None:
            return self._decorate(fn, None, overrides)
        return functools.partial(self._decorate, key=key, overrides=overrides)

    def _decorate(
        self, fn: Callable[..., Any], key: str | Callable[..., str] | None, overrides: _Overrides
    ) -> Any:
        if not callable(fn):
            raise TypeError(f"single_flight decorates callables, not {type(fn).__name__}")
        builder = key_builder(fn, key)
        wrapper = _async_wrapper if _is_async(fn) else _sync_wrapper
        return wrapt.FunctionWrapper(fn, wrapper(self, builder, overrides))

    def __repr__(self) -> str:
        s = self._settings
        where = "client" if s.client or s.async_client else (s.url or "DEDUPE_REDIS_URL")
        return f"SingleFlight({where}, prefix={s.prefix!r}, lock_ttl={s.lock_ttl})"


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    return inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _full_args(instance: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # wrapt hands a method's self (or a classmethod's cls) apart; the key binds it too.
    return args if instance is None else (instance, *args)


def _sync_wrapper(sf: SingleFlight, builder: KeyBuilder, o: _Overrides) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        job_id = builder(_full_args(instance, args), kwargs)
        return sf._run_sync(job_id, o, wrapped, args, kwargs)

    return wrapper


def _async_wrapper(sf: SingleFlight, builder: KeyBuilder, o: _Overrides) -> Callable[..., Any]:
    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        job_id = builder(_full_args(instance, args), kwargs)
        return await sf._run_async(job_id, o, wrapped, args, kwargs)

    return wrapper


single_flight: Final = SingleFlight()
"""The default instance: Redis from DEDUPE_REDIS_URL, else redis://localhost:6379/0, lazily."""
