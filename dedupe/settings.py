"""The settings of a SingleFlight, declared once.

Each field of :class:`Settings` is a ``setting(...)``: its default, its meaning (one line: the
README's Configuration table and ``help(SingleFlight)`` show it), the check of its values, and
whether a function may have its own value (``per_function``: the decorator's keywords). The
rest derives from these declarations:

- ``SingleFlight.__init__`` keeps an explicit, typed signature for users (IDE completion,
  mypy), builds a Settings from its arguments by these names, and its docstring's parameter
  list is rendered from the declarations;
- ``configure(**changes)`` accepts exactly these names;
- the decorator's per-function keywords are the ``per_function`` settings, checked by the same
  functions (``check_function_values``);
- ``BackendConfig`` (backend.py) is a Settings with the URL resolved and the codec built;
- README.md's Configuration table is generated from them (tests/test_settings.py checks it).

tests/test_settings.py fails when the typed signatures or the README table disagree with the
declarations. Adding a setting: one ``setting(...)`` here, then its keyword in
``SingleFlight.__init__`` (a per-function one also in each of the decorator's overloads),
then regenerate the README table (the failing test names the command).

The word for each time, everywhere: ``lock_ttl`` is the lease; ``result_ttl`` how long a
finished value is fresh (new callers are served it) after its run; ``token_ttl`` how long a
key's fencing-token counter lives; ``max_hold`` the longest one leader renews one lease.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, Final, TypeAlias, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from dedupe.backend.topology import parse_url
from dedupe.core.keys import validate_prefix
from dedupe.core.sealing import SecretSpec, secret_keys, validate_security
from dedupe.core.serializers import Serializer, resolve_serializer
from dedupe.errors import ConfigurationError

__all__ = [
    "AsyncClient",
    "Declared",
    "Settings",
    "SyncClient",
    "check_function_values",
    "check_relations",
    "declared",
    "help_text",
    "per_function",
    "setting",
]

SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"

_T = TypeVar("_T")
_MIB: Final = 1024 * 1024

Check: TypeAlias = Callable[[str, Any], None]
"""A setting's check: ``check(name, value)`` raises TypeError or ValueError naming it."""


# --- the checks: one per kind of value, each message naming the setting ----------------------


@dataclass(frozen=True, slots=True)
class Seconds:
    """A number of seconds: finite, >= 0 (``positive``: > 0; ``at_least``: a floor)."""

    none: bool = False  # None is a value of the setting
    positive: bool = False
    at_least: float = 0.0
    unit: str = "s"

    def __call__(self, name: str, value: object) -> None:
        if value is None and self.none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
        if not math.isfinite(value) or value < 0 or (value == 0 and self.positive):
            raise ValueError(
                f"{name} must be {'> 0' if self.positive else '>= 0'} and finite, not {value}"
            )
        if value < self.at_least:
            raise ValueError(f"{name} must be at least {self.at_least:g} s, not {value}")


@dataclass(frozen=True, slots=True)
class Size:
    """A whole number (of bytes, replicas) >= ``minimum``."""

    minimum: int = 0
    none: bool = False
    unit: str = ""  # "bytes": shown in MiB where whole

    def __call__(self, name: str, value: object) -> None:
        if value is None and self.none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise ValueError(f"{name} must be an int >= {self.minimum}, not {value!r}")


@dataclass(frozen=True, slots=True)
class OneOf:
    """One of a few strings."""

    choices: tuple[str, ...]

    def __call__(self, name: str, value: object) -> None:
        if value not in self.choices:
            either = " or ".join(repr(c) for c in self.choices)
            raise ValueError(f"{name} must be {either}, not {value!r}")


@dataclass(frozen=True, slots=True)
class Factor:
    """A plain number: finite, >= 0."""

    unit: str = ""

    def __call__(self, name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, not {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be >= 0 and finite, not {value}")


def _check_answers(name: str, value: object) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"{name} must be a tuple of exception classes, not {type(value).__name__}")
    for item in value:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{name} must hold exception classes only, not {item!r}")


def _check_url(name: str, value: object) -> None:
    if value is not None:
        parse_url(value)  # type: ignore[arg-type]  # it names the type it wants


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


def _check_prefix(name: str, value: object) -> None:
    validate_prefix(value)


def _check_serializer(name: str, value: object) -> None:
    resolve_serializer(value)  # type: ignore[arg-type]  # it names what it wants


def _check_secret(name: str, value: object) -> None:
    secret_keys(value)  # type: ignore[arg-type]  # it names what it wants


def _decodes_responses(client: object) -> bool:
    get_encoder = getattr(client, "get_encoder", None)
    try:
        encoder = get_encoder() if callable(get_encoder) else None
    except Exception:  # a client that cannot say: its first reply will tell
        return False
    return bool(getattr(encoder, "decode_responses", False))


def _no_socket(client: object) -> str | None:
    """The name of a client's connection class if it opens no real socket (fakeredis's
    connections override ``_connect``, which opens the socket, outside redis-py), else None.
    Cluster clients keep a pool per node: they are judged by their nodes."""
    pool = getattr(client, "connection_pool", None)
    cls = getattr(pool, "connection_class", None)
    if not isinstance(cls, type):
        return None
    connect = getattr(cls, "_connect", None)
    module = getattr(connect, "__module__", "") or ""
    if connect is None or module == "redis" or module.startswith("redis."):
        return None
    return cls.__qualname__


@dataclass(frozen=True, slots=True)
class Client:
    """A redis-py client of the given classes, not built with decode_responses=True."""

    types: tuple[type[Any], ...]
    described: str

    def __call__(self, name: str, value: object) -> None:
        if value is None:
            return
        if not isinstance(value, self.types):
            raise TypeError(f"{name} must be a {self.described}, not {type(value).__name__}")
        fake = _no_socket(value)
        if fake is not None:
            raise ConfigurationError(
                f"{name} is a client without a real socket transport (its connections are "
                f"{fake}: fakeredis, or a client like it), which dedupe cannot carry its "
                'scripts and pub/sub over: for tests without Redis use SingleFlight("memory://")'
            )
        if _decodes_responses(value):
            raise ValueError(
                f"{name} was built with decode_responses=True, but dedupe's records are bytes "
                "and would fail to decode: pass a client built without decode_responses (the "
                "default), or url= and let dedupe build its own"
            )


# --- the declaration ------------------------------------------------------------------------

_KEY: Final = "dedupe.setting"


@dataclass(frozen=True, slots=True)
class Declared:
    """What a setting declares beside its name, type and default."""

    doc: str  # its meaning, one line of markdown (the README table's cell)
    check: Check
    per_function: bool = False  # a decorated function may have its own value
    shown: str | None = None  # how docs show the default, where not the value itself

    def default_text(self, default: object) -> str:
        """The default as the README and help() show it, in markdown."""
        if self.shown is not None:
            return self.shown
        unit = getattr(self.check, "unit", "")
        if unit == "bytes" and isinstance(default, int) and default >= _MIB and not default % _MIB:
            return f"`{default // _MIB} MiB`"
        text = f'`"{default}"`' if isinstance(default, str) else f"`{default!r}`"
        return f"{text} {unit}" if unit and default is not None else text


def setting(
    default: _T,
    doc: str,
    check: Check,
    *,
    per_function: bool = False,
    shown: str | None = None,
) -> _T:
    """Declare one setting (a field of Settings): see the module's docstring."""
    declared = Declared(doc=doc, check=check, per_function=per_function, shown=shown)
    return field(default=default, metadata={_KEY: declared})


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one SingleFlight: ``sf.settings``.

    Times in seconds. Build one through SingleFlight(...) or sf.configure(...), which check
    every field (``validated()``).
    """

    url: str | None = setting(
        None,
        "`redis://`, `rediss://`, `unix://`, `redis+cluster://h:p[,h:p]`, "
        "`redis+sentinel://h:p[,h:p]/service[/db]`, `memory://[name]` (no Redis; this process "
        "only: see Testing your app); parsed when the instance is built (no connection): a "
        "malformed URL raises `ValueError` there, in sync and async code alike",
        _check_url,
        shown="`DEDUPE_REDIS_URL`, else `redis://localhost:6379/0`",
    )
    client: SyncClient | None = setting(  # noqa: RUF009 (setting() is a field specifier)
        None,
        "your own `redis.Redis`, `RedisCluster` or `sentinel.master_for(...)`; give it, "
        "`async_client` or both (the other is derived); not built with "
        "`decode_responses=True` (`ValueError`)",
        Client((redis.Redis, redis.cluster.RedisCluster), "redis.Redis or RedisCluster"),
        shown="built from `url` (or from `async_client`)",
    )
    async_client: AsyncClient | None = setting(  # noqa: RUF009 (setting() is a field specifier)
        None,
        "the asyncio twin: your own `redis.asyncio.Redis` or `RedisCluster` (or a Sentinel's "
        "`master_for(...)`); not built with `decode_responses=True` (`ValueError`)",
        Client(
            (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster),
            "redis.asyncio.Redis or RedisCluster",
        ),
        shown="built from `url` (or from `client`)",
    )
    prefix: str = setting("dedupe", "namespace of every key and channel (no braces)", _check_prefix)
    lock_ttl: float = setting(
        10.0,
        "the lease (at least 0.01 s); renewed every `lock_ttl/3` while the leader runs; "
        "bounds the takeover after a crash",
        Seconds(positive=True, at_least=0.01),
        per_function=True,
    )
    wait_timeout: float | None = setting(
        None,
        "most a follower waits before `WaitTimeout` (`.job_id`, `.seconds`); `None`: while a "
        "live leader holds the lease. Callers whose own call runs the function are not cut "
        "short by it",
        Seconds(none=True),
        per_function=True,
    )
    result_ttl: float = setting(
        1.0,
        "how long after its run a value stays fresh: callers that arrive meanwhile get it "
        "without a run; `0` keeps nothing",
        Seconds(),
        per_function=True,
    )
    stale_while_revalidate: float = setting(
        0.0,
        "for this long after `result_ttl` ends, callers get the stale value at once, and the "
        "first caller fleet-wide that finds it stale starts one refresh in the background "
        "(`Served.stale`); `0`: off",
        Seconds(),
        per_function=True,
    )
    stale_if_error: float = setting(
        0.0,
        "when a run fails and the last good value is at most this far past its `result_ttl`, "
        "everyone waiting on that run gets the stale value instead of the error, and the good "
        "value stays; `0`: off",
        Seconds(),
        per_function=True,
    )
    error_backoff: float | None = setting(
        None,
        "after a stale value stood in for a failed run, callers fleet-wide get it without a "
        "run for this long (at most `stale_if_error`)",
        Seconds(none=True),
        per_function=True,
        shown="`min(30, stale_if_error)` s",
    )
    soft_timeout: float | None = setting(
        None,
        "a caller that has waited this long for a run while a stale value exists gets the "
        "stale value; the run goes on and stores its outcome (needs `stale_if_error`; never "
        "cuts short a sync caller running the function itself); `None`: off",
        Seconds(none=True, positive=True),
        per_function=True,
    )
    early_refresh: float = setting(
        0.0,
        "XFetch's beta: a fresh hit starts one background refresh early, with a chance that "
        "grows near the end of `result_ttl` and with the last run's length (`1`: the paper's "
        "default); `0`: off",
        Factor(),
        per_function=True,
    )
    answers: tuple[type[BaseException], ...] = setting(
        (),
        "exception classes that are answers, not failures (a not-found): `stale_if_error` "
        "never replaces them (nor aborts: KeyboardInterrupt, SystemExit, CancelledError)",
        _check_answers,
        per_function=True,
    )
    max_background_runs: int = setting(
        16,
        "the most background refreshes this process runs at once; beyond it, callers get "
        "the stale value without starting one",
        Size(),
    )
    max_batch_size: int = setting(
        500,
        "a batch call claims at most this many items at once; a larger one runs in parts, in order",
        Size(minimum=1),
    )
    serializer: str | Serializer = setting(  # noqa: RUF009 (setting() is a field specifier)
        "safe",
        '`"safe"` (typed JSON: reading it runs no code), `"json"` (plain, lossy), `"pickle"` '
        '(needs `secret`), `"pickle-unsafe"` (whoever can write to the Redis, or only '
        "PUBLISH, runs code in this process), or an object with `ident`, `dumps`, `loads`",
        _check_serializer,
    )
    secret: SecretSpec = setting(  # noqa: RUF009 (setting() is a field specifier)
        None,
        'one key or several (a list, or `"new,old"` in `DEDUPE_SECRET`; the first signs, all '
        "verify); HMAC-SHA256 over every record and notice; none: unsigned",
        _check_secret,
        shown="`DEDUPE_SECRET`",
    )
    inline_max_bytes: int = setting(
        32 * 1024,
        "outcomes up to this size travel on the channel; larger ones are stored and fetched",
        Size(unit="bytes"),
    )
    max_payload_bytes: int | None = setting(
        64 * _MIB,
        "larger outcomes are not shipped: followers get `ResultTooLarge`; `None`: no limit",
        Size(none=True, unit="bytes"),
    )
    connect_timeout: float = setting(
        2.0,
        "most a connection attempt takes, on clients dedupe builds: a command takes at most "
        "`connect_timeout + socket_timeout`, one retry on a fresh connection included (after "
        "a failure or a timeout, with what is left of the bound)",
        Seconds(positive=True),
    )
    socket_timeout: float = setting(
        5.0,
        "most a command waits for its reply, on clients dedupe builds (see `connect_timeout`)",
        Seconds(positive=True),
    )
    health_check_interval: float = setting(
        5.0,
        "silent pub/sub connections are PINGed this often; no reply within another interval "
        "reconnects",
        Seconds(positive=True),
    )
    min_replicas_ack: int = setting(
        0,
        "after acquiring, `WAIT` (on the acquiring connection) for this many replicas; too "
        "few: `BackendUnavailable`",
        Size(),
    )
    replica_ack_timeout: float = setting(
        1.0, "how long that `WAIT` waits for the replicas", Seconds(positive=True)
    )
    on_backend_error: str = setting(
        "raise",
        '`"raise"`: `BackendUnavailable`; `"local"`: in-process deduplication while Redis is '
        "down (never for configuration errors)",
        OneOf(("raise", "local")),
    )
    local_cache: bool = setting(
        False,
        "keep each kept value in the process too, while Redis keeps it fresh; callers then "
        "share one object: do not mutate it",
        _check_bool,
    )
    token_ttl: float = setting(
        60.0,
        "how long a key's fencing-token counter lives after its last lease; tokens still grow",
        Seconds(positive=True, at_least=0.001),
    )
    max_hold: float = setting(
        300.0,
        "the longest one leader keeps renewing its lease (must exceed `lock_ttl`); after it "
        "the lease counts as lost and a waiter takes over",
        Seconds(positive=True),
    )
    local_cache_max_bytes: int = setting(
        32 * _MIB,
        "bounds the process's copies of kept values (`local_cache`), by estimated size",
        Size(minimum=1, unit="bytes"),
    )

    def validated(self) -> Settings:
        """Check every field (the URL is parsed, never connected to); return self."""
        for f, d in _DECLARED:
            d.check(f.name, getattr(self, f.name))
        check_relations(self)
        return self


def check_relations(s: Settings) -> None:
    """The checks that involve more than one setting (after each setting's own)."""
    if s.max_hold <= s.lock_ttl:
        raise ValueError(
            f"max_hold ({s.max_hold:g} s) must be longer than lock_ttl ({s.lock_ttl:g} s): it "
            "bounds how long one leader may keep renewing its lease"
        )
    validate_security(s.serializer, s.secret)  # pickle needs a secret
    if s.min_replicas_ack and s.url is not None and s.url.lower().startswith("memory:"):
        raise ValueError(
            "min_replicas_ack needs Redis replicas; a memory:// store has none: leave it at 0"
        )
    if s.error_backoff is not None and s.error_backoff > s.stale_if_error:
        raise ValueError(
            f"error_backoff ({s.error_backoff:g} s) must be at most stale_if_error "
            f"({s.stale_if_error:g} s): the backoff serves the stale value, which is served "
            "only within stale_if_error"
        )
    if s.soft_timeout is not None and not s.stale_if_error:
        raise ValueError(
            "soft_timeout needs stale_if_error > 0: a caller past its soft timeout gets a "
            "stale value, and stale_if_error is how long past result_ttl one is kept for it"
        )


def _declarations() -> Iterator[tuple[Field[Any], Declared]]:
    for f in fields(Settings):
        d = f.metadata.get(_KEY)
        if not isinstance(d, Declared):
            raise TypeError(f"Settings.{f.name} is not declared with setting()")
        yield f, d


_DECLARED: Final = tuple(_declarations())


def declared() -> tuple[tuple[Field[Any], Declared], ...]:
    """Every setting in declaration order: its field (name, type, default) and declaration."""
    return _DECLARED


def help_text(indent: int = 0) -> str:
    """The settings as ``help(SingleFlight)`` lists them (reStructuredText literals)."""
    pad = " " * indent
    items = []
    for f, d in _DECLARED:
        text = f"- ``{f.name}``: {_rst(d.doc)}. Default: {_rst(d.default_text(f.default))}."
        text = text.replace("`` s", "``\0s")  # keep a value and its unit on one line
        filled = textwrap.fill(text, 96, initial_indent=pad, subsequent_indent=pad + "  ")
        items.append(filled.replace("\0", " "))
    return "\n".join(items)


def _rst(markdown: str) -> str:
    return re.sub(r"(?<!`)`([^`]+)`(?!`)", r"``\1``", markdown)


def _takes_none(f: Field[Any], d: Declared) -> bool:
    try:
        d.check(f.name, None)
    except (TypeError, ValueError):
        return False
    return True


# Per-function settings: name -> (declaration, whether None is one of its values). A function
# given None for a setting that has no None value takes the instance's (as INHERIT does).
_PER_FUNCTION: Final[Mapping[str, tuple[Declared, bool]]] = {
    f.name: (d, _takes_none(f, d)) for f, d in _DECLARED if d.per_function
}


def per_function() -> tuple[str, ...]:
    """The names of the settings a decorated function may have its own value of."""
    return tuple(_PER_FUNCTION)


def check_function_values(
    given: Mapping[str, object], inherit: object, caller: str
) -> dict[str, object]:
    """A decorated function's own values among ``given`` (per-function keywords), each checked
    as the constructor checks it; ``inherit`` (and None where None is no value) means the
    instance's. A keyword that is no per-function setting is a TypeError, as Python's own."""
    own: dict[str, object] = {}
    for name, value in given.items():
        found = _PER_FUNCTION.get(name)
        if found is None:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        declared, takes_none = found
        if value is inherit or (value is None and not takes_none):
            continue
        declared.check(name, value)
        own[name] = value
    return own
