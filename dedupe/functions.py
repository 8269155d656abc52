"""What the decorator makes of a function: the wrappers, their handles (job_id, detailed,
forget) and the types that describe them; a sync flight's warning in a running event loop."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import warnings
from asyncio import _get_running_loop  # C: the running loop of this thread, or None
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, Protocol, TypeVar, overload

import wrapt

from dedupe.core.inflight import Served
from dedupe.core.keys import KeyBuilder, function_name
from dedupe.core.shapes import FROM_ANNOTATION, Shape, function_shape
from dedupe.overrides import Overrides

if TYPE_CHECKING:
    from dedupe.api import SingleFlight
    from dedupe.batches import AsyncBatchFunction, BatchFunction

__all__ = ["AsyncFlightFunction", "FlightFunction"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
K = TypeVar("K")
V = TypeVar("V")
S = TypeVar("S")


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


class BatchDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, Mapping[K, V]]]
    ) -> AsyncBatchFunction[P, K, V]: ...
    @overload
    def __call__(self, fn: Callable[P, Mapping[K, V]]) -> BatchFunction[P, K, V]: ...


class Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> AsyncFlightFunction[P, R]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, fn: Callable[P, R]) -> FlightFunction[P, R]: ...


class Flown:
    """One decorated function's flight settings; shared by its wrapper and bound wrappers."""

    __slots__ = ("builder", "is_async", "overrides", "returns", "sf", "shape", "warned", "wrapped")

    def __init__(
        self,
        sf: SingleFlight,
        builder: KeyBuilder,
        overrides: Overrides,
        is_async: bool,
        wrapped: Callable[..., Any],
        returns: Any = FROM_ANNOTATION,
    ) -> None:
        self.sf, self.builder, self.overrides, self.is_async = sf, builder, overrides, is_async
        self.warned = False  # a sync call blocked a running event loop (warned once)
        self.returns = returns
        self.wrapped = wrapped  # the decorated function, as the wrapper calls it
        # Resolved at the first call, not here: the annotation may name a class defined
        # further down the module. Written once (a race only resolves it twice).
        self.shape: Shape | Unresolved | None = UNRESOLVED

    def shape_of(self, fn: Callable[..., Any]) -> Shape | None:
        shape = self.shape
        if shape is UNRESOLVED:
            shape = self.shape = function_shape(fn, self.returns)
        return shape  # type: ignore[return-value]

    def job_id(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return self.builder(full_args(instance, args), kwargs)

    def run(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        detail: bool = False,
        wrapped: Callable[..., Any] | None = None,
        instance: Any = None,
    ) -> Any:
        """One call: ``wrapped`` (the decorated function unless given: a bound wrapper's)
        with ``args``; ``instance``, a bound wrapper's self, is the key's first argument."""
        if wrapped is None:
            wrapped = self.wrapped
        full = args if instance is None else (instance, *args)
        # KeyBuilder.__call__'s usual path inline (every argument by position: a frame less
        # on every call, some 1k instructions); anything else, a failure or an id that is no
        # valid one goes through the builder, which builds it again and says what is wrong.
        b = self.builder
        job_id: Any = None
        if not kwargs and len(full) == b.count:
            job_id = b.const
            if job_id is None and b.fast is not None:
                try:
                    job_id = b.fast(*full)
                except Exception:
                    job_id = None
        if type(job_id) is not str or not job_id:
            job_id = b(full, kwargs)
        shape: Any = self.shape
        if shape is UNRESOLVED:
            shape = self.shape_of(wrapped)
        if self.is_async:
            coro = self.sf._run_async(job_id, self.overrides, wrapped, args, kwargs, detail, shape)
            return named(coro, wrapped)
        if _get_running_loop() is not None and not self.warned:
            self.warned = True
            warn_blocking(wrapped)
        return self.sf._run_sync(job_id, self.overrides, wrapped, args, kwargs, detail, shape)

    def forget(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        job_id = self.job_id(instance, args, kwargs)
        return self.sf.aforget(job_id) if self.is_async else self.sf.forget(job_id)


class Unresolved:
    pass


UNRESOLVED: Final = Unresolved()


class BoundFlightFunctionWrapper(wrapt.BoundFunctionWrapper[..., Any]):
    """A decorated method, bound to its instance: the same handles, with self bound."""

    def job_id(self, *args: Any, **kwargs: Any) -> str:
        flown: Flown = self._self_parent._self_flown
        return flown.job_id(self._self_instance, args, kwargs)

    def detailed(self, *args: Any, **kwargs: Any) -> Any:
        flown: Flown = self._self_parent._self_flown
        return flown.run(args, kwargs, True, self.__wrapped__, self._self_instance)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        flown: Flown = self._self_parent._self_flown
        return flown.forget(self._self_instance, args, kwargs)


class ByReference:
    """A decorated function as pickle and copy see it: by reference, like a plain function
    (so ProcessPoolExecutor.map and multiprocessing can send it); mixed in before wrapt's
    FunctionWrapper, which refuses both."""

    __wrapped__: Any

    def __reduce_ex__(self, protocol: Any) -> str:
        # A str tells pickle: "the global of this name in the object's module", which it
        # checks is this very object; functions defined in a function cannot be sent.
        name: str = self.__wrapped__.__qualname__
        return name

    def __reduce__(self) -> str:
        return self.__reduce_ex__(2)

    def __copy__(self) -> Any:
        return self  # a function, like a plain one: copies are the object itself

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self


class FlightFunctionWrapper(ByReference, wrapt.FunctionWrapper[..., Any]):
    """The decorated function: calls run as flights; it pickles by reference, as a plain
    function does (so ProcessPoolExecutor.map and multiprocessing can send it)."""

    __bound_function_wrapper__ = BoundFlightFunctionWrapper

    def __init__(self, wrapped: Callable[..., Any], flown: Flown) -> None:
        super().__init__(wrapped, wrapper_for(flown, wrapped))
        self._self_flown = flown

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Not wrapt's call: that looks up the wrapped function's __self__ on every call (a
        # plain function's missing one raised and cleared an AttributeError: some 2k
        # instructions) and passes it as the instance, though a bound method's signature,
        # which the key is built by, has no self. One attribute of the proxy, not three:
        # each costs a __getattribute__ lookup through wrapt's proxy.
        return self._self_flown.run(args, kwargs)

    def job_id(self, *args: Any, **kwargs: Any) -> str:
        return self._self_flown.job_id(None, args, kwargs)

    def detailed(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_flown.run(args, kwargs, True)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_flown.forget(None, args, kwargs)


def wrapper_for(flown: Flown, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        return flown.run(args, kwargs, False, wrapped, instance)

    return wrapper


def named(coro: Coroutine[Any, Any, R], fn: Callable[..., Any]) -> Coroutine[Any, Any, R]:
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

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # dedupe/
_WRAPT_DIR = os.path.dirname(os.path.abspath(wrapt.__file__)) + os.sep
_warned_calls: set[object] = set()  # sf.call's sync functions warned about (their code)
_warned_lock = threading.Lock()  # guards _warned_calls


def warn_blocking(fn: Callable[..., Any]) -> None:
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


def warn_blocking_once(fn: Callable[..., Any]) -> None:
    """warn_blocking for sf.call: once per function (its code, so that a lambda made anew
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
    warn_blocking(fn)


def full_args(instance: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # wrapt hands a method's self (or a classmethod's cls) apart; the key binds it too.
    return args if instance is None else (instance, *args)


def check_runnable(fn: object, refused: str) -> None:
    """Refuse, as a TypeError, what no flight can run or share: not a callable (a classmethod
    object under the decorator is not one), or a generator function (its generator can be
    consumed once, by one caller, and cannot travel to another process). ``refused``
    begins the message: "single_flight decorates callables", "fn must be callable"."""
    if not callable(fn):
        hint = ""
        if isinstance(fn, classmethod):
            hint = ": put @classmethod above the single_flight decorator, not below"
        raise TypeError(f"{refused}, not {type(fn).__name__}{hint}")
    inner: Any = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    if not (inspect.isfunction(inner) or inspect.ismethod(inner)):
        inner = getattr(inner, "__call__", inner)  # noqa: B004 (a callable object's method)
    if inspect.isgeneratorfunction(inner) or inspect.isasyncgenfunction(inner):
        raise TypeError(
            f"{function_name(fn)} is a generator function: its generator could be consumed "
            "by one caller only and cannot be sent to other processes; return a list (or "
            "another value) instead"
        )


def is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    return inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
