"""Job ids: key templates, key callables, the canonical digest of bound arguments, Redis names."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import hashlib
import inspect
import pathlib
import re
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["KeyBuilder", "Names", "key_builder", "names_for", "validate_job_id", "validate_prefix"]

# Longer ids, and ids Redis Cluster would mis-tag or a terminal would mangle, go by digest.
_MAX_PLAIN_ID = 200
_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+")
_MAX_DEPTH = 64


class Names(NamedTuple):
    """The Redis keys and channel of one job; all share one hash tag, hence one cluster slot."""

    job_id: str
    lock: str
    token: str
    result: str
    channel: str


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str):
        raise TypeError(f"job id must be a str, not {type(job_id).__name__}")
    if not job_id:
        raise ValueError("job id must not be empty")
    return job_id


def validate_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty str, not {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(
            f"prefix must not hold braces (they would break cluster hash tags): {prefix!r}"
        )
    return prefix


def _tag(job_id: str) -> str:
    plain = (
        len(job_id) <= _MAX_PLAIN_ID
        and job_id.isprintable()
        and "{" not in job_id
        and "}" not in job_id
        and not job_id.startswith("#")
    )
    if plain:
        return job_id
    raw = job_id.encode("utf-8", "surrogatepass")
    return "#" + hashlib.sha256(raw).hexdigest()[:40]


def names_for(prefix: str, job_id: str) -> Names:
    validate_prefix(prefix)
    tag = _tag(validate_job_id(job_id))
    base = f"{prefix}:{{{tag}}}"
    return Names(job_id, f"{base}:lock", f"{base}:token", f"{base}:result", base)


# --- canonical encoding of arguments -------------------------------------------------------


def _qualname(tp: type) -> str:
    return f"{tp.__module__}.{tp.__qualname__}"


def _canon(obj: object, where: str, depth: int = 0) -> str:
    if depth > _MAX_DEPTH:
        raise TypeError(f"argument {where!r} is nested too deeply to build a stable key")
    tp = type(obj)
    if obj is None:
        return "N"
    if tp is bool:
        return "b1" if obj else "b0"
    if tp is int:
        return f"i{obj}"
    if tp is float:
        return f"f{obj!r}"
    if tp is str:
        text: str = obj  # type: ignore[assignment]
        return f"s{len(text)}:{text}"
    if tp in (bytes, bytearray):
        raw: bytes = bytes(obj)  # type: ignore[call-overload]
        return f"y{raw.hex()}"
    if tp in (tuple, list):
        items: Any = obj
        inner = ",".join(_canon(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(items))
        return f"{'t' if tp is tuple else 'l'}({inner})"
    if tp in (set, frozenset):
        members: Any = obj
        inner = ",".join(sorted(_canon(v, f"{where}{{}}", depth + 1) for v in members))
        return f"S({inner})"
    if isinstance(obj, dict):
        mapping: Any = obj
        pairs = sorted(
            f"{_canon(k, f'{where}.keys()', depth + 1)}={_canon(v, f'{where}[{k!r}]', depth + 1)}"
            for k, v in mapping.items()
        )
        return f"d({','.join(pairs)})"
    if isinstance(obj, enum.Enum):
        return f"e{_qualname(tp)}.{obj.name}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ",".join(
            f"{f.name}={_canon(getattr(obj, f.name), f'{where}.{f.name}', depth + 1)}"
            for f in dataclasses.fields(obj)
        )
        return f"D{_qualname(tp)}({fields})"
    if isinstance(
        obj,
        (
            int,
            float,
            str,
            bytes,
            decimal.Decimal,
            fractions.Fraction,
            complex,
            uuid.UUID,
            datetime.date,
            datetime.time,
            datetime.timedelta,
            datetime.tzinfo,
            pathlib.PurePath,
        ),
    ):
        return f"r{_qualname(tp)}:{obj!r}"
    text = repr(obj)
    if _ADDRESS.search(text) or text == object.__repr__(obj):
        raise TypeError(
            f"argument {where!r} ({_qualname(tp)}) has no stable representation for a key: its "
            "repr carries a memory address; give the class a __repr__, or pass key= instead"
        )
    return f"r{_qualname(tp)}:{text}"


def args_digest(arguments: Mapping[str, object]) -> str:
    """A digest of bound arguments that is identical in every process and every call form."""
    canon = ";".join(f"{name}={_canon(value, name)}" for name, value in arguments.items())
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# --- builders -------------------------------------------------------------------------------


P = inspect.Parameter


class KeyBuilder:
    """Turns one call's arguments into its job id."""

    def __init__(self, fn: Callable[..., object], build: Callable[[dict[str, Any]], str]):
        self._signature = inspect.signature(fn)
        self._build = build
        params = list(self._signature.parameters.values())
        kinds = {p.kind for p in params}
        # Binding by hand is five times cheaper than Signature.bind; it covers the common
        # signatures and leaves *args, **kwargs and every error case to Signature.bind.
        self._simple = not kinds & {P.VAR_POSITIONAL, P.VAR_KEYWORD}
        self._names = [p.name for p in params]
        self._positional = [
            p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
        ]
        self._by_keyword = {p.name for p in params if p.kind is not P.POSITIONAL_ONLY}
        self._defaults = {p.name: p.default for p in params if p.default is not P.empty}

    def arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, in signature order, defaults applied."""
        if self._simple and len(args) <= len(self._positional):
            given = dict(zip(self._positional, args, strict=False))
            for name, value in kwargs.items():
                if name in given or name not in self._by_keyword:
                    break
                given[name] = value
            else:
                if len(given) == len(self._names):
                    return {name: given[name] for name in self._names}
                try:
                    return {
                        name: given[name] if name in given else self._defaults[name]
                        for name in self._names
                    }
                except KeyError:
                    pass  # a required argument is missing: let bind() say which
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        return validate_job_id(self._build(self.arguments(args, kwargs)))


def _template_fields(template: str) -> list[str]:
    roots = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        root = re.match(r"[^.\[]*", field)
        roots.append(root.group(0) if root else field)
    return roots


def key_builder(fn: Callable[..., object], key: str | Callable[..., str] | None) -> KeyBuilder:
    """Check a key spec against ``fn`` once, at decoration time, and return its builder."""
    params = inspect.signature(fn).parameters
    where = getattr(fn, "__qualname__", repr(fn))
    if key is None:
        prefix = f"{getattr(fn, '__module__', '?')}.{where}"
        return KeyBuilder(fn, lambda arguments: f"{prefix}:{args_digest(arguments)}")
    if isinstance(key, str):
        if not key:
            raise ValueError("key template must not be empty")
        for name in _template_fields(key):
            if not name or name.isdigit():
                raise TypeError(
                    f"key template {key!r} uses a positional field; name the argument of "
                    f"{where} instead, as in '{{user_id}}'"
                )
            if name not in params:
                raise TypeError(
                    f"key template {key!r} names {name!r}, but {where} has no argument {name!r}"
                )
        template = key

        def build_from_template(arguments: dict[str, Any]) -> str:
            try:
                return template.format(**arguments)
            except (AttributeError, KeyError, IndexError) as exc:
                raise TypeError(f"key template {template!r} failed for {where}: {exc}") from exc

        return KeyBuilder(fn, build_from_template)
    if callable(key):
        return KeyBuilder(fn, _callable_key(fn, key, where, params))
    raise TypeError(f"key must be a str template, a callable or None, not {type(key).__name__}")


def _callable_key(
    fn: Callable[..., object],
    key: Callable[..., str],
    where: str,
    params: Mapping[str, inspect.Parameter],
) -> Callable[[dict[str, Any]], str]:
    key_params = inspect.signature(key).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in key_params.values())
    wanted = [
        name
        for name, p in key_params.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    for name in wanted:
        if name not in params and key_params[name].default is inspect.Parameter.empty:
            raise TypeError(f"key callable wants {name!r}, but {where} has no argument {name!r}")

    def build_from_callable(arguments: dict[str, Any]) -> str:
        if takes_all:
            chosen = arguments
        else:
            chosen = {n: arguments[n] for n in wanted if n in arguments}
        job_id = key(**chosen)
        if not isinstance(job_id, str):
            raise TypeError(f"key callable for {where} returned {type(job_id).__name__}, not str")
        return job_id

    return build_from_callable
