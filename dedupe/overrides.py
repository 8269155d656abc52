"""A decorated function's own settings (its overrides of the instance's), and the flight
parameters worked out from them once per settings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final, NamedTuple

from dedupe.backend.lifecycle import Backend
from dedupe.core.keys import Names
from dedupe.core.protocol import FlightSpec, FlightTerms, Reads
from dedupe.core.shapes import Shape
from dedupe.settings import Settings

__all__ = [
    "INHERIT",
    "NO_OVERRIDES",
    "FlightParams",
    "Inherit",
    "Overrides",
    "SpecMaker",
    "spec_maker",
]


class Inherit:
    """The default of a per-function setting: take the SingleFlight's (also after configure)."""

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT: Final[Any] = Inherit()
"""Default of the decorator's per-function settings (lock_ttl, ...): use the instance's."""


# --- a function's own settings --------------------------------------------------------------


class Overrides:
    """A decorated function's own values of per-function settings (settings.per_function());
    the rest, and any it leaves out, are the instance's, also after configure(). Compared and
    hashed by value: the key of SingleFlight's parameter cache."""

    __slots__ = ("_hash", "values")

    def __init__(self, **values: Any) -> None:
        self.values: Final = tuple(sorted(values.items()))
        self._hash: Final = hash(self.values)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Overrides) and self.values == other.values

    def __repr__(self) -> str:
        return f"Overrides({', '.join(f'{k}={v!r}' for k, v in self.values)})"

    def apply(self, s: Settings) -> Settings:
        """The function's settings: ``s`` with its own values (not checked again)."""
        return replace(s, **dict(self.values)) if self.values else s


NO_OVERRIDES: Final = Overrides()  # sf.call's: the instance's settings


class FlightParams(NamedTuple):
    """A function's flight parameters under one Settings: FlightSpec's fields but the
    flight's own (names, owner, deadline), plus its wait_timeout."""

    lock_ttl_ms: int
    token_ttl_ms: int
    result_ttl_ms: int
    grace_ms: int
    inline_max_bytes: int
    min_replicas: int
    replica_timeout_ms: int
    max_hold_ms: int
    wait_timeout: float | None
    stale_ms: int
    error_ms: int
    backoff_ms: int
    early_refresh: float
    answers: tuple[type[BaseException], ...]
    soft_timeout: float | None
    # Whether flights read a kept value before the acquire script, and while they hit: for
    # a function that keeps values and draws no early refresh (XFetch draws on every hit,
    # in the script). One per function and settings: how its reads have been doing.
    reads: Reads | None
    # The fields above that are FlightTerms', in one object its flights' specs share.
    terms: FlightTerms

    @classmethod
    def of(cls, s: Settings) -> FlightParams:
        fields = cls._fields_of(s)
        terms = FlightTerms(**{name: fields[name] for name in FlightTerms._fields})
        return cls(**fields, terms=terms)

    @staticmethod
    def _fields_of(s: Settings) -> dict[str, Any]:
        lock_ms = max(10, round(s.lock_ttl * 1000))
        return dict(
            lock_ttl_ms=lock_ms,
            token_ttl_ms=max(1, round(s.token_ttl * 1000)),
            result_ttl_ms=round(s.result_ttl * 1000),
            # Any outcome stays readable this long, for followers that missed its message.
            grace_ms=lock_ms + 2000,
            inline_max_bytes=s.inline_max_bytes,
            min_replicas=s.min_replicas_ack,
            replica_timeout_ms=round(s.replica_ack_timeout * 1000),
            # A lease is never cut shorter than one lock_ttl, even if configure() made
            # max_hold shorter than a function's own lock_ttl.
            max_hold_ms=max(round(s.max_hold * 1000), lock_ms + 1),
            wait_timeout=s.wait_timeout,
            stale_ms=round(s.stale_while_revalidate * 1000),
            error_ms=round(s.stale_if_error * 1000),
            # After a failed run, this long with no run; configure() may have shortened
            # stale_if_error below a function's own backoff: the window bounds it.
            backoff_ms=round(
                min(30.0 if s.error_backoff is None else s.error_backoff, s.stale_if_error) * 1000
            ),
            early_refresh=float(s.early_refresh),
            answers=s.answers,
            soft_timeout=s.soft_timeout if s.stale_if_error else None,
            reads=Reads() if s.result_ttl > 0 and not s.early_refresh else None,
        )


def spec_maker(
    backend: Backend,
    names: Names,
    p: FlightParams,
    shape: Shape | None = None,
    reads: bool = True,
) -> SpecMaker:
    """The FlightSpec of each flight of one job: its parameters, its owner, its deadlines.
    ``reads`` False: no plain read first (a batch's items acquire in one pipeline)."""
    return SpecMaker(backend, names, p, shape, p.reads if reads else None)


class SpecMaker:
    """spec_maker's callable, one per call. An object with slots, not a closure: a caller
    holds it while it waits, and a closure over four cells costs 384 bytes against 72
    (issue 23's memory per flight). ``reads``: the function's read credit; None once the
    call read (or asked the credit) before its flight (``call.read_first``), so that its
    flight starts at the acquire script."""

    __slots__ = ("backend", "names", "p", "reads", "shape")

    def __init__(
        self,
        backend: Backend,
        names: Names,
        p: FlightParams,
        shape: Shape | None,
        reads: Reads | None,
    ) -> None:
        self.backend, self.names, self.p, self.shape = backend, names, p, shape
        self.reads = reads

    def __call__(self, deadline: float | None, soft_deadline: float | None) -> FlightSpec:
        return FlightSpec(
            names=self.names,
            owner=self.backend.owner(),
            deadline=deadline,
            soft_deadline=soft_deadline,
            shape=self.shape,
            reads=self.reads,
            terms=self.p.terms,
        )
