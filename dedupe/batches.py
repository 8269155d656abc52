"""Batches: many keys in one call (``@sf.batch``, ``sf.call_batch``), each still run once.

A batch function takes a collection of items first and returns a mapping from item to value
(``def load_users(ids: list[int]) -> dict[int, User]``). Each item is a job of its own, with
the id its key gives it: the batch joins single-key flights of those ids already running,
single-key calls join the batch's, and the function is called once, with just the items this
call leads (see dedupe.core.batch for how).

What a call returns: a dict of the items it was given (duplicates collapse) to their values;
an item the function's mapping leaves out is absent, and not kept. If any item failed, the
call raises BatchError carrying the values obtained and each failed item's exception;
``.detailed(...)`` returns a BatchResult with both side by side instead, never raising for an
item (as ``asyncio.gather(return_exceptions=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

import wrapt

from dedupe.core.keys import BatchKeys, Names, names_for, validate_job_id
from dedupe.core.sealing import Outcome
from dedupe.core.shapes import FROM_ANNOTATION, Shape, function_shape
from dedupe.errors import BatchError
from dedupe.functions import ByReference

if TYPE_CHECKING:
    from dedupe.api import SingleFlight
    from dedupe.overrides import Overrides

__all__ = ["AsyncBatchFunction", "BatchFunction", "BatchResult"]

P = ParamSpec("P")
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class BatchResult(Generic[K, V]):
    """A batch's outcome per item, never raised (``fn.detailed(...)``, ``call_batch_detailed``).

    ``values``: the items that got a value; ``errors``: each failed item's exception (one
    per caller: the leader's own object for the items it ran, a copy elsewhere); ``stale``:
    the items whose value is past its ``result_ttl`` (stale_while_revalidate, stale_if_error,
    soft_timeout). An item in neither map was left out by the function's mapping."""

    values: dict[K, V]
    errors: dict[K, BaseException]
    stale: frozenset[K]

    def unwrap(self) -> dict[K, V]:
        """The values, or BatchError if any item failed."""
        if self.errors:
            raise BatchError(self.values, self.errors)
        return self.values


class BatchFunction(Protocol[P, K, V]):
    """What ``@sf.batch`` makes of a function: called, a dict of item to value (BatchError
    if any item failed); ``.detailed(...)`` a BatchResult; ``.job_ids(...)`` each item's job
    id; ``.forget(...)`` each item's ``sf.forget``."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> dict[K, V]: ...
    def detailed(self, *args: P.args, **kwargs: P.kwargs) -> BatchResult[K, V]: ...
    def job_ids(self, *args: P.args, **kwargs: P.kwargs) -> dict[K, str]: ...
    def forget(self, *args: P.args, **kwargs: P.kwargs) -> dict[K, bool]: ...


class AsyncBatchFunction(Protocol[P, K, V]):
    """BatchFunction of a coroutine function: every handle but ``job_ids`` gives a coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, dict[K, V]]: ...
    def detailed(
        self, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, BatchResult[K, V]]: ...
    def job_ids(self, *args: P.args, **kwargs: P.kwargs) -> dict[K, str]: ...
    def forget(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, dict[K, bool]]: ...


class Batched:
    """One batch function's settings: its keys, its own per-function values, sync or async."""

    __slots__ = ("is_async", "keys", "overrides", "resolved", "returns", "sf", "shape")

    def __init__(
        self,
        sf: SingleFlight,
        keys: BatchKeys,
        overrides: Overrides,
        is_async: bool,
        returns: Any = FROM_ANNOTATION,
    ):
        self.sf, self.keys, self.overrides, self.is_async = sf, keys, overrides, is_async
        self.returns = returns
        self.shape: Shape | None = None  # each item's: resolved at the first call
        self.resolved = False

    def plan(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], list[str], Callable[[Callable[..., Any], list[Any]], Any]]:
        """The call's items, their job ids, and how to call the function with some of them."""
        full = args if instance is None else (instance, *args)
        items, others = self.keys.items(full, kwargs)
        ids = [self.keys.job_id(item, others) for item in items]
        return items, ids, _caller(self.keys.collection, args, kwargs, instance is not None)

    def run(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        detail: bool,
    ) -> Any:
        items, ids, call = self.plan(instance, args, kwargs)
        if not self.resolved:
            self.shape = function_shape(wrapped, self.returns, batch=True)
            self.resolved = True
        runner = _Runner(
            self.sf, self.overrides, items, ids, lambda led: call(wrapped, led), self.shape
        )
        if self.is_async:
            return runner.run_async(detail)
        return runner.run_sync(detail)

    def job_ids(
        self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[Any, str]:
        items, ids, _ = self.plan(instance, args, kwargs)
        return dict(zip(items, ids, strict=True))

    def forget(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        by_item = self.job_ids(instance, args, kwargs)
        sf = self.sf
        if self.is_async:

            async def forget_all() -> dict[Any, bool]:
                return {item: await sf.aforget(job_id) for item, job_id in by_item.items()}

            return forget_all()
        return {item: sf.forget(job_id) for item, job_id in by_item.items()}


def _caller(
    collection: str, args: tuple[Any, ...], kwargs: dict[str, Any], bound: bool
) -> Callable[[Callable[..., Any], list[Any]], Any]:
    """How to call the function with the items led: the call's own arguments, the
    collection replaced (given by position or by name)."""
    if collection in kwargs:
        return lambda fn, led: fn(*args, **{**kwargs, collection: led})
    return lambda fn, led: fn(led, *args[1:], **kwargs)


class _Runner:
    """One batch call: its items cut to max_batch_size, each part run as one batch."""

    def __init__(
        self,
        sf: SingleFlight,
        overrides: Overrides,
        items: list[Any],
        ids: list[str],
        fn: Callable[[list[Any]], Any],
        shape: Shape | None = None,
    ) -> None:
        self.sf, self.overrides, self.items, self.ids, self.fn = sf, overrides, items, ids, fn
        self.shape = shape  # of each item's value

    def parts(self) -> Iterable[tuple[list[Any], list[Names]]]:
        size = self.sf.settings.max_batch_size
        prefix = self.sf.settings.prefix
        for at in range(0, len(self.items), size):
            items = self.items[at : at + size]
            yield items, [names_for(prefix, job_id) for job_id in self.ids[at : at + size]]

    def run_sync(self, detail: bool) -> Any:
        from dedupe.drivers import sync

        result = _Gathered()
        for items, names in self.parts():
            backend, make, p = self.sf._batch_plumbing(names, self.overrides, self.shape)
            outcomes = sync.call_batch(
                backend, names, make, p.wait_timeout, lambda led: self.fn(led), items, (), {},
                soft_timeout=p.soft_timeout,
            )  # fmt: skip
            result.add(items, outcomes)
        return result.done(detail)

    async def run_async(self, detail: bool) -> Any:
        from dedupe.drivers import aio

        result = _Gathered()
        for items, names in self.parts():
            backend, make, p = self.sf._batch_plumbing(names, self.overrides, self.shape)
            outcomes = await aio.call_batch(
                backend, names, make, p.wait_timeout, lambda led: self.fn(led), items, (), {},
                soft_timeout=p.soft_timeout,
            )  # fmt: skip
            result.add(items, outcomes)
        return result.done(detail)


class _Gathered:
    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.errors: dict[Any, BaseException] = {}
        self.stale: set[Any] = set()

    def add(self, items: list[Any], outcomes: list[Outcome | None]) -> None:
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is None:
                continue  # left out of the function's mapping: absent
            if outcome.error is not None:
                self.errors[item] = outcome.error
                continue
            self.values[item] = outcome.value
            if outcome.stale:
                self.stale.add(item)

    def done(self, detail: bool) -> Any:
        result = BatchResult(self.values, self.errors, frozenset(self.stale))
        return result if detail else result.unwrap()


class BoundBatchFunction(wrapt.BoundFunctionWrapper[..., Any]):
    """A batch method, bound to its instance."""

    def detailed(self, *args: Any, **kwargs: Any) -> Any:
        batched: Batched = self._self_parent._self_batched
        return batched.run(self.__wrapped__, self._self_instance, args, kwargs, True)

    def job_ids(self, *args: Any, **kwargs: Any) -> dict[Any, str]:
        batched: Batched = self._self_parent._self_batched
        return batched.job_ids(self._self_instance, args, kwargs)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        batched: Batched = self._self_parent._self_batched
        return batched.forget(self._self_instance, args, kwargs)


class BatchFunctionWrapper(ByReference, wrapt.FunctionWrapper[..., Any]):
    """The decorated batch function; it pickles by reference, as a plain function does."""

    __bound_function_wrapper__ = BoundBatchFunction

    def __init__(self, wrapped: Callable[..., Any], batched: Batched) -> None:
        def wrapper(fn: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            return batched.run(fn, instance, args, kwargs, False)

        super().__init__(wrapped, wrapper)
        self._self_batched = batched

    def detailed(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_batched.run(self.__wrapped__, None, args, kwargs, True)

    def job_ids(self, *args: Any, **kwargs: Any) -> dict[Any, str]:
        return self._self_batched.job_ids(None, args, kwargs)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_batched.forget(None, args, kwargs)


def adhoc(
    sf: SingleFlight,
    overrides: Overrides,
    items: Iterable[Any],
    fn: Callable[..., Any],
    key: str | Callable[[Any], str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    is_async: bool,
    detail: bool,
) -> Any:
    """sf.call_batch: ``key`` is a template over ``{item}`` or a callable of one item; the
    job ids are the keys themselves (as sf.call's ids), shared with sf.call and with
    ``namespace=False`` functions of the same keys."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"items must be a collection of items, not {type(items).__name__}")
    try:
        unique = list(dict.fromkeys(items))
    except TypeError as exc:
        raise TypeError(f"the items of a batch must be hashable: {exc}") from None
    if isinstance(key, str):
        template = key
        ids = [validate_job_id(template.format(item=item)) for item in unique]
    elif callable(key):
        ids = [validate_job_id(key(item)) for item in unique]
    else:
        raise TypeError(f"key must be a str template over {{item}} or a callable, not {key!r}")
    shape = function_shape(fn, batch=True)
    runner = _Runner(sf, overrides, unique, ids, lambda led: fn(led, *args, **kwargs), shape)
    return runner.run_async(detail) if is_async else runner.run_sync(detail)
