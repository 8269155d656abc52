"""SingleFlight: the decorator, ``call``, ``configure``, and the default instance."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import weakref
from asyncio import _get_running_loop  # C: the running loop of this thread, or None
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import (
    Any,
    Final,
    ParamSpec,
    TypeVar,
    overload,
)

from dedupe.backend.commands import ScriptCall, forget_call, notify_call, typed_errors
from dedupe.backend.lifecycle import Backend, BackendConfig
from dedupe.backend.topology import parse_url
from dedupe.batches import (
    AsyncBatchFunction,
    Batched,
    BatchFunction,
    BatchFunctionWrapper,
    adhoc,
)
from dedupe.core.call import copy_hit
from dedupe.core.context import leading_state
from dedupe.core.inflight import InFlightInfo, Served
from dedupe.core.keys import (
    Names,
    batch_keys,
    checked_names,
    key_builder,
    names_for,
    validate_job_id,
)
from dedupe.core.protocol import FlightSpec
from dedupe.core.record import NOTICE_ABORTED
from dedupe.core.sealing import SecretSpec, codec_for
from dedupe.core.serializers import Serializer
from dedupe.core.shapes import FROM_ANNOTATION, Shape, function_shape
from dedupe.drivers import aio, sync
from dedupe.functions import (
    AsyncFlightFunction,
    BatchDecorator,
    Decorator,
    FlightFunction,
    FlightFunctionWrapper,
    Flown,
    check_runnable,
    is_async,
    named,
    warn_blocking_once,
)
from dedupe.ops import events, inspector
from dedupe.ops.inspector import JobState
from dedupe.overrides import INHERIT, NO_OVERRIDES, FlightParams, Overrides, spec_maker
from dedupe.settings import (
    AsyncClient,
    Settings,
    SyncClient,
    check_function_values,
    check_relations,
    declared,
    help_text,
    per_function,
)

__all__ = ["CallOptions", "Settings", "SingleFlight", "single_flight"]

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")

DEFAULT_URL: Final = "redis://localhost:6379/0"

log = logging.getLogger("dedupe")
_RECENT_NAMES: Final = 1024  # job names remembered per SingleFlight (then forgotten at once)


# --- the instance -------------------------------------------------------------------------


_instances: weakref.WeakSet[SingleFlight] = weakref.WeakSet()  # for the fork handler below


async def _ready(value: Any) -> Any:
    """A call served at once (a local copy), as the coroutine the caller awaits."""
    return value


async def _raising(exc: BaseException) -> Any:
    """A call that failed before its flight, failing where it is awaited."""
    raise exc


class SingleFlight:
    """Runs a function once across every concurrent caller that shares a Redis.

    Use it as a decorator (``@sf``, ``@sf(key="user:{user_id}")``) or ad hoc
    (``sf.call("job-id", fn, *args)``). Sync functions block the caller (in a thread that
    runs an event loop, the loop: a RuntimeWarning says so, once per function); coroutine
    functions stay coroutine functions. Nothing connects until the first call; every
    argument is checked here (the URL is parsed, not dialled).

    Parameters: the settings (dedupe.settings.Settings, where each is declared), all but
    ``url`` keyword-only; times in seconds. Raises TypeError or ValueError naming the
    argument that is wrong.
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
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
        error_backoff: float | None = None,
        soft_timeout: float | None = None,
        early_refresh: float = 0.0,
        answers: tuple[type[BaseException], ...] = (),
        max_background_runs: int = 16,
        max_batch_size: int = 500,
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
        # The signature spells every setting out for IDEs and mypy (tests/test_settings.py
        # keeps it equal to the declarations); the body takes them by the declared names.
        given = locals()
        try:
            values = {f.name: given[f.name] for f, _ in declared()}
        except KeyError as exc:
            raise TypeError(f"SingleFlight.__init__ lacks a keyword for {exc.args[0]!r}") from None
        settings = Settings(**values).validated()
        self._lock = threading.Lock()  # guards _backend and _settings swaps
        _instances.add(self)
        self._settings = settings
        self._backend: Backend | None = None
        # The flight parameters of each function's overrides, under the settings they were
        # worked out from (configure() replaces _settings: they are worked out anew).
        self._params: dict[Overrides, tuple[Settings, FlightParams]] = {}
        # Recent jobs' Redis names under the settings they were made for (a hot key's hit
        # skips validating and spelling them again); no lock: a race only repeats the work.
        self._recent: tuple[Settings, dict[str, Names]] = (settings, {})

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
            await old.aclose_tasks(timeout)  # this loop's background refreshes
            await old.aclose_loop_client()
            await asyncio.to_thread(old.close, timeout)

    def __enter__(self) -> SingleFlight:
        """``with SingleFlight(...) as sf:``: close() at the end of the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SingleFlight:
        """``async with SingleFlight(...) as sf:``: aclose() at the end of the block."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

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
        url = s.url or os.environ.get("DEDUPE_REDIS_URL") or DEFAULT_URL
        if s.url is None and s.client is None and s.async_client is None:
            try:
                parse_url(url)
            except ValueError as exc:
                raise ValueError(f"DEDUPE_REDIS_URL: {exc}") from None
        codec = codec_for(s.serializer, s.secret, s.max_payload_bytes)
        return Backend(BackendConfig.of(s, url=url, codec=codec))

    def _spec_maker(
        self, backend: Backend, names: Names, o: Overrides
    ) -> Callable[[float | None, float | None], FlightSpec]:
        return spec_maker(backend, names, self._flight_params(o))

    def _flight_params(self, o: Overrides) -> FlightParams:
        """A function's flight parameters, worked out once per settings and overrides (this
        is on every call's path: one dict lookup when nothing changed)."""
        s = self._settings
        cached = self._params.get(o)
        if cached is None or cached[0] is not s:
            self._params[o] = cached = (s, FlightParams.of(o.apply(s)))
        return cached[1]

    def _names(self, job_id: str) -> Names:
        settings, table = self._recent
        if settings is self._settings:
            names = table.get(job_id)
            if names is not None:
                return names
        else:
            self._recent = settings, table = self._settings, {}
        names = checked_names(settings.prefix, job_id)  # both checked: the settings, the call
        if len(table) >= _RECENT_NAMES:
            table.clear()
        table[job_id] = names
        return names

    # --- running ------------------------------------------------------------------------------

    def _run_sync(
        self,
        job_id: str,
        o: Overrides,
        fn: Callable[..., R],
        args: Any,
        kw: Any,
        detail: bool = False,
        shape: Shape | None = None,
    ) -> Any:
        backend = self._backend or self.backend()
        # The remembered names of a recent job inline (a hot key's path), else _names.
        settings, table = self._recent
        names = table.get(job_id) if settings is self._settings else None
        if names is None:
            names = self._names(job_id)
        # Without Served or events, the call's first steps are taken without the machine:
        # the local copy here, then the read of the kept value (sync.call). Outside a
        # leader's function copy_hit and LocalCopies.get inline, as their frames were most
        # of a copy's cost; inside one copy_hit checks for reentry first.
        first = not (detail or events.enabled)
        copies = backend.local_copies
        if first and copies is not None:
            if leading_state.get() is None:
                got = copies.entries.get(names.channel)
                if got is not None and got[0] > copies.clock():
                    return got[1]
            else:
                hit, value = copy_hit(backend, names)
                if hit:
                    return value
        return sync.call(backend, names, self._flight_params(o), shape, fn, args, kw,
                         detail=detail, first=first)  # fmt: skip

    def _run_async(
        self,
        job_id: str,
        o: Overrides,
        fn: Callable[..., Awaitable[R]],
        args: Any,
        kw: Any,
        detail: bool = False,
        shape: Shape | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """The call's coroutine: aio.call's own, with no coroutine of ours around it (a
        waiting caller holds one frame less: issue 23's memory per flight). What comes before
        it is done now, when the call is made; what it raises is raised when it is awaited,
        as before."""
        try:
            backend = self._backend or self.backend()
            # The remembered names of a recent job inline (a hot key's path), else _names.
            settings, table = self._recent
            names = table.get(job_id) if settings is self._settings else None
            if names is None:
                names = self._names(job_id)
            # As _run_sync's first steps: the local copy now, the read in aio.call.
            first = not (detail or events.enabled)
            copies = backend.local_copies
            if first and copies is not None:
                if leading_state.get() is None:
                    got = copies.entries.get(names.channel)
                    if got is not None and got[0] > copies.clock():
                        return _ready(got[1])
                else:
                    hit, value = copy_hit(backend, names)
                    if hit:
                        return _ready(value)
            p = self._flight_params(o)
        except Exception as exc:  # an abort (KeyboardInterrupt) goes on up at once
            return _raising(exc)
        return aio.call(backend, names, p, shape, fn, args, kw,  # type: ignore[arg-type]
                        detail=detail, first=first)  # fmt: skip

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
        to await; a plain function runs now. ``fn``'s return annotation says what its values
        are (see the decorator's ``returns``); ``sf.options(returns=...)`` names another.
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
        """As ``call``, but return ``Served(value, shared, role, stale, age)``: ``shared`` is
        False only for the caller that ran ``fn``; ``role`` is "leader", "local" (joined a call
        in this process), "remote" (another process's leader), "kept" (a finished flight's
        value, from Redis) or "copy" (this process's local copy of one: ``local_cache``);
        ``stale`` whether the value is past its ``result_ttl``; ``age`` its age in seconds by
        the server's clock."""
        return self._call(job_id, fn, args, kwargs, True)

    def _call(
        self,
        job_id: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        detail: bool,
        o: Overrides = NO_OVERRIDES,
        returns: Any = FROM_ANNOTATION,
    ) -> Any:
        validate_job_id(job_id)
        check_runnable(fn, "fn must be callable")
        shape = function_shape(fn, returns)
        if is_async(fn):
            return named(self._run_async(job_id, o, fn, args, kwargs, detail, shape), fn)
        if _get_running_loop() is not None:
            warn_blocking_once(fn)
        return self._run_sync(job_id, o, fn, args, kwargs, detail, shape)

    def options(
        self,
        *,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
        returns: Any = FROM_ANNOTATION,
    ) -> CallOptions:
        """``call`` and ``call_detailed`` with their own values of the per-function settings
        (a call's keywords are its function's): ``sf.options(stale_while_revalidate=30)
        .call("user:1", load_user, 1)``. Checked here, as the decorator checks them.
        ``returns``: the type the call's values have, in place of ``fn``'s return annotation
        (see the decorator)."""
        given = {k: v for k, v in locals().items() if k not in ("self", "returns")}
        overrides = Overrides(**check_function_values(given, INHERIT, "SingleFlight.options"))
        check_relations(overrides.apply(self._settings))
        return CallOptions(self, overrides, returns)

    def inflight(self) -> list[InFlightInfo]:
        """The flights of this process now: job id, leading or following, local waiters, age."""
        return self.backend().inflight()

    def inspect(self, job_id: str) -> JobState:
        """What Redis holds for ``job_id`` now: holder (host, pid, lease start), fencing
        token, lease time left, the kept outcome and its age, subscribers across nodes. Reads
        only; see dedupe.ops.inspector.JobState."""
        validate_job_id(job_id)
        with typed_errors():
            return inspector.inspect(self.backend().sync_client(), self._settings.prefix, job_id)

    def forget(self, job_id: str) -> bool:
        """Drop the value kept for ``job_id`` (in Redis, and this process's local copy), so
        the next call runs the function: call it after a write that makes the value stale.

        It also voids a run going on now (memcache's delete-voids-lease): once forget
        returns, no call that starts later gets a value from a run that started before it.
        That run's own callers (and those already waiting on it) still get its outcome; it
        stores nothing, and waiters in other processes are told to look again at once.

        Returns True if anything was dropped: a kept value Redis could still serve (fresh,
        or stale within a stale window), a running flight it voided, or a fresh local copy
        (``local_cache``); False if there was none.
        Decorated functions have ``fn.forget(*args, **kwargs)``; raises BackendUnavailable
        or ConfigurationError as a call would."""
        names, backend, dropped = self._forgetting(job_id)
        with typed_errors():
            kept, voided = backend.run_sync_script(forget_call(names, self._token_ttl_ms()))
        if voided:
            try:
                backend.run_sync_script(self._voided_notice(backend, names, int(voided)))
            except Exception as exc:  # a hint only: the waiters look again at the lease's end
                log.info("could not tell the waiters of %r to look again: %s", job_id, exc)
        return bool(kept) or bool(voided) or dropped

    async def aforget(self, job_id: str) -> bool:
        """``forget`` for asyncio code: the same, over the asyncio client."""
        names, backend, dropped = self._forgetting(job_id)
        with typed_errors():
            kept, voided = await backend.run_async_script(forget_call(names, self._token_ttl_ms()))
        if voided:
            try:
                await backend.run_async_script(self._voided_notice(backend, names, int(voided)))
            except Exception as exc:  # a hint only: the waiters look again at the lease's end
                log.info("could not tell the waiters of %r to look again: %s", job_id, exc)
        return bool(kept) or bool(voided) or dropped

    def _token_ttl_ms(self) -> int:
        return max(1, round(self._settings.token_ttl * 1000))

    @staticmethod
    def _voided_notice(backend: Backend, names: Names, token: int) -> ScriptCall:
        notice = backend.codec.notice(NOTICE_ABORTED, channel=names.channel, token=token)
        return notify_call(names, notice, backend.publish)

    def _forgetting(self, job_id: str) -> tuple[Names, Backend, bool]:
        names = names_for(self._settings.prefix, validate_job_id(job_id))
        backend = self.backend()
        copies = backend.local_copies
        dropped = copies is not None and copies.discard(names.channel)
        backend.void_flights(names.channel)  # callers from now on start a flight of their own
        return names, backend, dropped

    # --- batches ------------------------------------------------------------------------------

    def _batch_plumbing(
        self, names: list[Names], o: Overrides, shape: Shape | None = None
    ) -> tuple[Backend, Callable[[int, float | None, float | None], FlightSpec], FlightParams]:
        """A batch part's backend, each item's spec maker, and the function's parameters."""
        backend = self.backend()
        p = self._flight_params(o)
        makers = [spec_maker(backend, n, p, shape, reads=False) for n in names]
        return backend, lambda i, deadline, soft: makers[i](deadline, soft), p

    @overload
    def batch(
        self,
        fn: Callable[P, Coroutine[Any, Any, Mapping[K, V]]],
        /,
        *,
        key: str | Callable[[Any], str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
    ) -> AsyncBatchFunction[P, K, V]: ...
    @overload
    def batch(
        self,
        fn: Callable[P, Mapping[K, V]],
        /,
        *,
        key: str | Callable[[Any], str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
    ) -> BatchFunction[P, K, V]: ...
    @overload
    def batch(
        self,
        fn: None = None,
        /,
        *,
        key: str | Callable[[Any], str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
    ) -> BatchDecorator: ...
    def batch(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: str | Callable[[Any], str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        **own: Any,
    ) -> Any:
        """Decorate a batch function (``@sf.batch(key="user:{item}")``): it takes a collection
        of items first and returns a mapping of item to value; each item is a job of its own,
        run once across every caller, batch or single-key (see dedupe.batches).

        - ``key``: a template naming ``{item}`` (attributes and indexing work) and the
          function's other arguments, or a callable of one item; None: a digest of the item.
        - ``namespace``: as for ``@sf``: with the same namespace and key, ``@sf.batch`` and
          ``@sf`` share job ids, so a batch joins single-key flights and they join it.
        - ``returns``: as for ``@sf``, the mapping type (``dict[int, User]``): each item's
          value travels as its value type's plain data.
        - the per-function settings, per item.

        The result keeps ``fn``'s signature; called, it returns a dict of item to value
        (BatchError if an item failed); ``.detailed(...)`` returns a BatchResult;
        ``.job_ids(...)`` and ``.forget(...)`` work per item.
        """
        overrides = Overrides(**check_function_values(own, INHERIT, "SingleFlight.batch"))
        check_relations(overrides.apply(self._settings))

        def decorate(fn: Callable[..., Any]) -> Any:
            check_runnable(fn, "sf.batch decorates callables")
            keys = batch_keys(fn, key, namespace)
            batched = Batched(self, keys, overrides, is_async(fn), returns)
            return BatchFunctionWrapper(fn, batched)

        return decorate(fn) if fn is not None else decorate

    def call_batch(
        self,
        items: Iterable[Any],
        fn: Callable[..., Any],
        /,
        *args: Any,
        key: str | Callable[[Any], str],
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(items_led, *args, **kwargs)`` for the items no other caller runs, and
        return a dict of item to value (BatchError if one failed; a coroutine for a coroutine
        function). ``key``: a template over ``{item}`` or a callable of one item, giving each
        item's job id as sf.call's (shared with ``sf.call`` of that id)."""
        check_runnable(fn, "fn must be callable")
        return adhoc(self, NO_OVERRIDES, items, fn, key, args, kwargs, is_async(fn), False)

    def call_batch_detailed(
        self,
        items: Iterable[Any],
        fn: Callable[..., Any],
        /,
        *args: Any,
        key: str | Callable[[Any], str],
        **kwargs: Any,
    ) -> Any:
        """As ``call_batch``, but return a BatchResult (values, errors, stale) and never
        raise for an item."""
        check_runnable(fn, "fn must be callable")
        return adhoc(self, NO_OVERRIDES, items, fn, key, args, kwargs, is_async(fn), True)

    # --- decorating ---------------------------------------------------------------------------

    # The per-function settings (settings.per_function()) are spelled out in each overload,
    # for IDEs and mypy (tests/test_settings.py keeps them equal to the declarations).
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self,
        fn: Callable[P, Coroutine[Any, Any, R]],
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
    ) -> AsyncFlightFunction[P, R]: ...
    @overload
    def __call__(
        self,
        fn: Callable[P, R],
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
    ) -> FlightFunction[P, R]: ...
    @overload
    def __call__(
        self,
        fn: None = None,
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        lock_ttl: float | None = INHERIT,
        wait_timeout: float | None = INHERIT,
        result_ttl: float | None = INHERIT,
        stale_while_revalidate: float | None = INHERIT,
        stale_if_error: float | None = INHERIT,
        error_backoff: float | None = INHERIT,
        soft_timeout: float | None = INHERIT,
        early_refresh: float | None = INHERIT,
        answers: tuple[type[BaseException], ...] | None = INHERIT,
    ) -> Decorator: ...
    def __call__(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: str | Callable[..., str] | None = None,
        namespace: bool | str = True,
        returns: Any = FROM_ANNOTATION,
        **own: Any,
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
        - ``returns``: the type values have (default: ``fn``'s return annotation). Values of
          dataclasses, NamedTuple, TypedDict, Enum and Pydantic models travel as plain data
          and other processes rebuild them by this type, never by what Redis holds;
          ``returns=Any`` sends values as they are.
        - the per-function settings: this function's own values (INHERIT: the instance's,
          also after ``configure``), checked as the constructor checks them: {per_function}.

        The result keeps ``fn``'s signature and adds ``.job_id(...)``, ``.detailed(...)`` and
        ``.forget(...)``; it pickles by reference, like the function.
        """
        overrides = Overrides(**check_function_values(own, INHERIT, "SingleFlight.__call__"))
        check_relations(overrides.apply(self._settings))  # e.g. its lock_ttl under max_hold
        if fn is not None:
            return self._decorate(fn, key, namespace, overrides, returns)
        return functools.partial(
            self._decorate, key=key, namespace=namespace, overrides=overrides, returns=returns
        )

    def _decorate(
        self,
        fn: Callable[..., Any],
        key: str | Callable[..., str] | None,
        namespace: bool | str,
        overrides: Overrides,
        returns: Any = FROM_ANNOTATION,
    ) -> Any:
        check_runnable(fn, "single_flight decorates callables")
        builder = key_builder(fn, key, namespace)
        return FlightFunctionWrapper(fn, Flown(self, builder, overrides, is_async(fn), fn, returns))

    def __repr__(self) -> str:
        s = self._settings
        where = "client" if s.client or s.async_client else (s.url or "DEDUPE_REDIS_URL")
        return f"SingleFlight({where}, prefix={s.prefix!r}, lock_ttl={s.lock_ttl})"


class CallOptions:
    """``SingleFlight.options(...)``: ``call`` and ``call_detailed`` under per-call settings
    (the rest the instance's, also after ``configure``)."""

    __slots__ = ("_overrides", "_returns", "_sf")

    def __init__(
        self, sf: SingleFlight, overrides: Overrides, returns: Any = FROM_ANNOTATION
    ) -> None:
        self._sf = sf
        self._overrides = overrides
        self._returns = returns

    def __repr__(self) -> str:
        return f"CallOptions({self._sf!r}, {self._overrides!r})"

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
        """``SingleFlight.call`` under these settings."""
        return self._sf._call(job_id, fn, args, kwargs, False, self._overrides, self._returns)

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
        """``SingleFlight.call_detailed`` under these settings."""
        return self._sf._call(job_id, fn, args, kwargs, True, self._overrides, self._returns)


def _document() -> None:
    """Write the settings, as declared, into help(SingleFlight) and help(sf.__call__)."""
    if SingleFlight.__doc__:  # None under python -OO
        SingleFlight.__doc__ += "\n" + help_text(indent=4) + "\n"
    decorate: Any = SingleFlight.__call__
    if decorate.__doc__:
        names = ", ".join(f"``{name}``" for name in per_function())
        decorate.__doc__ = decorate.__doc__.replace("{per_function}", names)


_document()

single_flight: Final = SingleFlight()
"""The default instance: Redis from DEDUPE_REDIS_URL, else redis://localhost:6379/0, lazily."""


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays held in the child for good: give
    # every instance a fresh one there (its backend re-creates its own state, backend.py).
    for sf in list(_instances):
        sf._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
