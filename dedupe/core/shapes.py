"""Shapes: a function's return annotation, compiled into how its values travel as plain data.

A leader's value is turned into plain data (``Shape.dump``: a dataclass into a dict of its
fields, an Enum member into its value, a Pydantic model into its JSON-mode dump) before the
serializer sees it; a follower rebuilds it from its *own* annotation (``Shape.load``), as
FastAPI does with ``response_model``. So nothing read from Redis chooses a class: a record
can at worst fail to fit the annotation (ShapeError), never build a type the annotation
does not name.

Understood: None, the scalars the safe serializer carries (int, float, str, bytes, datetime,
...), ``list``/``tuple``/``set``/``frozenset``/``dict`` and their abstract kin
(``Sequence``, ``Mapping``), ``Optional`` and unions, ``Literal``, ``Annotated``,
``NewType``, ``type`` aliases, Enum, dataclasses (nested, recursive, generic, frozen),
NamedTuple, TypedDict, and Pydantic v2 models (through ``TypeAdapter``, when pydantic is
imported: it is not a dependency). Anything else (``Any``, a TypeVar, a plain class) passes
through as it is, which is dedupe's behaviour without an annotation.

Each class is checked exactly (a subclass would come back as its base, so it is refused,
as the safe serializer refuses subclasses). A union is sent as the first member that takes
the value; if two members could give the same plain data (two dataclasses), as
``[index, plain]``, the index naming a member of the annotation.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import inspect
import logging
import sys
import threading
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "FROM_ANNOTATION",
    "NO_ANNOTATION",
    "Shape",
    "ShapeError",
    "function_shape",
    "item_shape",
    "return_annotation",
    "shape_of",
]

_Fn = Callable[[Any], Any]


class ShapeError(TypeError):
    """A value does not fit the annotation; ``str()`` says where (``.items[2].name: ...``)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, path)
        self.message = message
        self.path = path

    def at(self, step: str) -> ShapeError:
        return ShapeError(self.message, step + self.path)

    def __str__(self) -> str:
        return f"at {self.path}: {self.message}" if self.path else self.message


def _tname(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return (
            tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
        )
    return repr(tp).replace("typing.", "")


def _expected(what: str, value: Any) -> ShapeError:
    return ShapeError(f"expected {what}, got {_tname(value)}")


class _Node:
    """One annotation, compiled: ``dump`` to plain data, ``load`` back, and ``kinds``: the
    exact types its plain data may have (None: any), to tell union members apart."""

    __slots__ = ("dump", "kinds", "load")

    def __init__(self, dump: _Fn, load: _Fn, kinds: frozenset[type] | None) -> None:
        self.dump, self.load, self.kinds = dump, load, kinds


class Shape:
    """A return annotation, compiled once: ``dump`` (leader, value to plain data) and ``load``
    (follower, plain data to value); both raise ShapeError naming where the value misfits."""

    __slots__ = ("_node", "annotation")

    def __init__(self, annotation: Any, node: _Node) -> None:
        self.annotation = annotation
        self._node = node

    def __repr__(self) -> str:
        return f"Shape({_name(self.annotation)})"

    @property
    def name(self) -> str:
        return _name(self.annotation)

    def dump(self, value: Any) -> Any:
        return self._node.dump(value)

    def load(self, plain: Any) -> Any:
        try:
            return self._node.load(plain)
        except ShapeError:
            raise
        except RecursionError:
            raise ShapeError("value nested too deep") from None
        except Exception as exc:  # a class's own __post_init__ or validator refusing it
            raise ShapeError(f"could not rebuild it: {type(exc).__name__}: {exc}") from None


# --- scalars ---------------------------------------------------------------------------------

# What each scalar annotation takes (int for float, as PEP 484 says), and the plain types
# such a value arrives as.
_SCALARS: Final[dict[type, tuple[type, ...]]] = {
    bool: (bool,),
    int: (int,),
    float: (float, int),
    complex: (complex, float, int),
    str: (str,),
    bytes: (bytes,),
    bytearray: (bytearray,),
    dt.datetime: (dt.datetime,),
    dt.date: (dt.date,),
    dt.time: (dt.time,),
    dt.timedelta: (dt.timedelta,),
    decimal.Decimal: (decimal.Decimal,),
    uuid.UUID: (uuid.UUID,),
}
_KINDS: Final[dict[type, frozenset[type]]] = {
    bool: frozenset({bool}),
    int: frozenset({int, bool}),
    float: frozenset({float, int, bool}),
    complex: frozenset({complex, float, int, bool}),
    dt.date: frozenset({dt.date, dt.datetime}),
}


def _checker(accepted: tuple[type, ...], what: str) -> _Fn:
    def check(value: Any) -> Any:
        if isinstance(value, accepted):
            return value
        raise _expected(what, value)

    return check


def _scalar(tp: type) -> _Node:
    check = _checker(_SCALARS[tp], _name(tp))
    return _Node(check, check, _KINDS.get(tp, frozenset({tp})))


def _none() -> _Node:
    def check(value: Any) -> Any:
        if value is None:
            return None
        raise _expected("None", value)

    return _Node(check, check, frozenset({type(None)}))


def _literal(values: tuple[Any, ...]) -> _Node:
    allowed = [(type(v), v) for v in values]

    def check(value: Any) -> Any:
        for t, v in allowed:
            if type(value) is t and value == v:
                return value
        raise ShapeError(f"expected one of {list(values)!r}, got {value!r:.80}")

    return _Node(check, check, frozenset(t for t, _ in allowed))


# --- containers ------------------------------------------------------------------------------


def _each(fn: _Fn, items: Any) -> list[Any]:
    out = []
    for i, x in enumerate(items):
        try:
            out.append(fn(x))
        except ShapeError as exc:
            raise exc.at(f"[{i}]") from None
    return out


def _list(item: _Node | None, abstract: bool) -> _Node:
    """list[T]; ``abstract``: Sequence[T], which keeps a tuple a tuple."""
    accepted: tuple[type, ...] = (list, tuple) if abstract else (list,)
    what = "a sequence (list or tuple)" if abstract else "list"

    def dump(value: Any) -> Any:
        if not isinstance(value, accepted):
            raise _expected(what, value)
        if item is None:
            return value if type(value) in (list, tuple) else list(typing.cast(Any, value))
        out = _each(item.dump, value)
        return tuple(out) if isinstance(value, tuple) else out

    def load(plain: Any) -> Any:
        if type(plain) not in accepted:
            raise _expected(what, plain)
        if item is None:
            return plain
        out = _each(item.load, plain)
        return tuple(out) if type(plain) is tuple else out

    return _Node(dump, load, frozenset(accepted))


def _tuple(items: list[_Node | None] | None, rest: _Node | None) -> _Node:
    """tuple[A, B] (``items``) or tuple[T, ...] (``rest``, items None)."""

    def convert(value: Any, dumping: bool) -> tuple[Any, ...]:
        if items is not None and len(value) != len(items):
            raise ShapeError(f"expected a tuple of {len(items)} items, got {len(value)}")
        out = []
        for i, x in enumerate(value):
            node = rest if items is None else items[i]
            if node is None:
                out.append(x)
                continue
            try:
                out.append(node.dump(x) if dumping else node.load(x))
            except ShapeError as exc:
                raise exc.at(f"[{i}]") from None
        return tuple(out)

    def dump(value: Any) -> Any:
        if not isinstance(value, tuple):
            raise _expected("tuple", value)
        return convert(value, True)

    def load(plain: Any) -> Any:
        if type(plain) not in (tuple, list):  # plain JSON has lists only
            raise _expected("tuple", plain)
        return convert(plain, False)

    return _Node(dump, load, frozenset({tuple, list}))


def _set(item: _Node | None, frozen: bool) -> _Node:
    kind: type = frozenset if frozen else set
    what = kind.__name__

    def dump(value: Any) -> Any:
        if not isinstance(value, (set, frozenset)):
            raise _expected(what, value)
        return kind(value if item is None else _each(item.dump, value))

    def load(plain: Any) -> Any:
        if type(plain) not in (set, frozenset, list):
            raise _expected(what, plain)
        return kind(plain if item is None else _each(item.load, plain))

    return _Node(dump, load, frozenset({set, frozenset, list}))


def _dict(key: _Node | None, val: _Node | None) -> _Node:
    def convert(value: Any, dumping: bool) -> dict[Any, Any]:
        out = {}
        for k, v in value.items():
            try:
                if key is not None:
                    k = key.dump(k) if dumping else key.load(k)
                if val is not None:
                    v = val.dump(v) if dumping else val.load(v)
            except ShapeError as exc:
                raise exc.at(f"[{k!r:.40}]") from None
            out[k] = v
        return out

    def dump(value: Any) -> Any:
        if not isinstance(value, cabc.Mapping):
            raise _expected("dict", value)
        if key is None and val is None and type(value) is dict:
            return value
        return convert(value, True)

    def load(plain: Any) -> Any:
        if type(plain) is not dict:
            raise _expected("dict", plain)
        return plain if key is None and val is None else convert(plain, False)

    return _Node(dump, load, frozenset({dict}))


def _union(members: list[Any], nodes: list[_Node]) -> _Node:
    """A union of members with a node each. Sent as the first member that takes the value;
    as ``[index, plain]`` when two members' plain data could be confused."""
    kinds: list[frozenset[type]] = []
    for node in nodes:
        if node.kinds is None:
            break
        kinds.append(node.kinds)
    seen: set[type] = set()
    clear = len(kinds) == len(nodes)
    for k in kinds:
        if seen & k:
            clear = False
        seen |= k
    what = " | ".join(_name(m) for m in members)
    none_at = next((i for i, m in enumerate(members) if m is None or m is type(None)), -1)

    def dump(value: Any) -> Any:
        if value is None and none_at >= 0:  # Optional's None: no member tried first
            return None if clear else [none_at, None]
        for i, node in enumerate(nodes):
            try:
                plain = node.dump(value)
            except ShapeError:
                continue
            return plain if clear else [i, plain]
        raise _expected(what, value)

    def load(plain: Any) -> Any:
        if clear:
            t = type(plain)
            for node, k in zip(nodes, kinds, strict=True):
                if t in k:
                    return node.load(plain)
            raise _expected(what, plain)
        if type(plain) is not list or len(plain) != 2 or type(plain[0]) is not int:
            raise _expected(f"[index, value] of {what}", plain)
        index, inner = plain
        if not 0 <= index < len(nodes):
            raise ShapeError(f"no member {index} in {what}")
        return nodes[index].load(inner)

    return _Node(dump, load, frozenset(seen) if clear else frozenset({list}))


# --- classes ---------------------------------------------------------------------------------


def _exact(cls: type, value: Any) -> None:
    if type(value) is not cls:
        raise _expected(f"exactly {_name(cls)}", value)


def _built(cls: type, make: Callable[[], Any]) -> Any:
    """``cls`` built by its own constructor, which may refuse the data in its own words."""
    try:
        return make()
    except ShapeError:
        raise
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{_name(cls)}(...) refused the data: {exc}") from None


def _fields(
    hints: dict[str, Any], names: list[str], compile_: Callable[[Any], _Node | None]
) -> list[tuple[str, _Node | None]]:
    return [(n, compile_(hints.get(n, Any))) for n in names]


def _record(cls: type, fields: list[tuple[str, _Node | None]]) -> _Node:
    """A dataclass: a dict of its init fields, rebuilt by calling the class."""
    names = frozenset(n for n, _ in fields)

    def dump(value: Any) -> Any:
        _exact(cls, value)
        out = {}
        for name, node in fields:
            v = getattr(value, name)
            if node is not None:
                try:
                    v = node.dump(v)
                except ShapeError as exc:
                    raise exc.at(f".{name}") from None
            out[name] = v
        return out

    def load(plain: Any) -> Any:
        if type(plain) is not dict:
            raise _expected(f"dict of {_name(cls)}'s fields", plain)
        extra = plain.keys() - names
        if extra:
            raise ShapeError(f"{_name(cls)} has no field {sorted(map(str, extra))[0]!r}")
        kwargs = {}
        for name, node in fields:
            if name in plain:
                v = plain[name]
                if node is not None:
                    try:
                        v = node.load(v)
                    except ShapeError as exc:
                        raise exc.at(f".{name}") from None
                kwargs[name] = v
        return _built(cls, lambda: cls(**kwargs))

    return _Node(dump, load, frozenset({dict}))


def _named_tuple(cls: type, fields: list[tuple[str, _Node | None]]) -> _Node:
    def convert(value: Any, dumping: bool) -> list[Any]:
        out = []
        for (name, node), v in zip(fields, value, strict=False):
            if node is not None:
                try:
                    v = node.dump(v) if dumping else node.load(v)
                except ShapeError as exc:
                    raise exc.at(f".{name}") from None
            out.append(v)
        return out

    def dump(value: Any) -> Any:
        _exact(cls, value)
        return tuple(convert(value, True))

    def load(plain: Any) -> Any:
        if type(plain) not in (tuple, list) or len(plain) > len(fields):
            raise _expected(f"the {len(fields)} fields of {_name(cls)}", plain)
        items = convert(plain, False)
        return _built(cls, lambda: cls(*items))

    return _Node(dump, load, frozenset({tuple, list}))


def _typed_dict(cls: Any, fields: list[tuple[str, _Node | None]]) -> _Node:
    required = frozenset(cls.__required_keys__)
    nodes = dict(fields)
    what = _name(cls)

    def convert(value: Any, dumping: bool) -> dict[str, Any]:
        missing = required - value.keys()
        if missing:
            raise ShapeError(f"{what} needs key {sorted(missing)[0]!r}")
        out = {}
        for k, v in value.items():
            if k not in nodes:
                raise ShapeError(f"{what} has no key {k!r:.40}")
            node = nodes[k]
            if node is not None:
                try:
                    v = node.dump(v) if dumping else node.load(v)
                except ShapeError as exc:
                    raise exc.at(f"[{k!r}]") from None
            out[k] = v
        return out

    def dump(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _expected(f"dict ({what})", value)
        return convert(value, True)

    def load(plain: Any) -> Any:
        if type(plain) is not dict:
            raise _expected(f"dict ({what})", plain)
        return convert(plain, False)

    return _Node(dump, load, frozenset({dict}))


def _enum(cls: type[enum.Enum]) -> _Node:
    def dump(value: Any) -> Any:
        _exact(cls, value)
        return value.value

    def load(plain: Any) -> Any:
        return _built(cls, lambda: cls(plain))

    kinds = frozenset(type(m.value) for m in cls) | ({int} if issubclass(cls, enum.Flag) else set())
    return _Node(dump, load, kinds or None)


def _pydantic(cls: type, pydantic: Any) -> _Node:
    """A Pydantic model, through TypeAdapter: its JSON-mode dump, validated back."""
    adapter = pydantic.TypeAdapter(cls)

    def dump(value: Any) -> Any:
        _exact(cls, value)
        return adapter.dump_python(value, mode="json")

    def load(plain: Any) -> Any:
        try:
            return adapter.validate_python(plain)
        except pydantic.ValidationError as exc:
            raise ShapeError(f"{_name(cls)} refused the data: {exc}") from None

    root = issubclass(cls, pydantic.RootModel)
    return _Node(dump, load, None if root else frozenset({dict}))


# --- compiling -------------------------------------------------------------------------------


class _Lazy:
    """A class met again while its own fields compile (a recursive type): the node that
    will be, looked up at the first call."""

    def __init__(self, kinds: frozenset[type]) -> None:
        self.node: _Node | None = None
        self.kinds = kinds

    def dump(self, value: Any) -> Any:
        assert self.node is not None
        return self.node.dump(value)

    def load(self, plain: Any) -> Any:
        assert self.node is not None
        return self.node.load(plain)


_UNIONS: Final = (typing.Union, types.UnionType)
_LISTS: Final = {list: False, cabc.MutableSequence: False, cabc.Sequence: True}
_SETS: Final = {set: False, cabc.MutableSet: False, frozenset: True, cabc.Set: True}
_DICTS: Final = (dict, cabc.Mapping, cabc.MutableMapping)


class _Compiler:
    def __init__(self) -> None:
        self.open: dict[Any, _Lazy] = {}

    def __call__(self, tp: Any) -> _Node | None:
        """The node of ``tp``; None: passed through unchecked (Any, a TypeVar, a class this
        module does not know)."""
        if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
            return None
        if tp is None or tp is type(None):
            return _none()
        if isinstance(tp, str | typing.ForwardRef):
            return None  # unresolved: left alone (get_type_hints resolves what it can)
        value = getattr(tp, "__value__", None)
        if value is not None and type(tp).__name__ == "TypeAliasType":
            return self(value)
        supertype = getattr(tp, "__supertype__", None)
        if supertype is not None:  # NewType
            return self(supertype)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self(args[0])
        if origin in _UNIONS:
            nodes = [self(a) for a in args]
            if any(n is None for n in nodes):
                return None
            return _union(list(args), [n for n in nodes if n is not None])
        if origin is typing.Literal:
            return _literal(args)
        if origin is not None and isinstance(origin, type):
            return self._generic(tp, origin, args)
        if isinstance(tp, type):
            return self._class(tp, tp, {})
        return None

    def _generic(self, tp: Any, origin: type, args: tuple[Any, ...]) -> _Node | None:
        if origin in _LISTS:
            return _list(self(args[0]) if args else None, _LISTS[origin])
        if origin is tuple:
            if not args:
                return _tuple(None, None)
            if len(args) == 2 and args[1] is Ellipsis:
                return _tuple(None, self(args[0]))
            if args == ((),):  # tuple[()]
                return _tuple([], None)
            return _tuple([self(a) for a in args], None)
        if origin in _SETS:
            return _set(self(args[0]) if args else None, _SETS[origin])
        if origin in _DICTS:
            return _dict(self(args[0]), self(args[1])) if args else _dict(None, None)
        params = getattr(origin, "__parameters__", ())
        if len(params) == len(args):  # a generic dataclass or model: Box[int]
            return self._class(tp, origin, dict(zip(params, args, strict=True)))
        return None

    def _class(self, key: Any, cls: type, bound: dict[Any, Any]) -> _Node | None:
        if cls in _SCALARS:
            return _scalar(cls)
        if cls in _LISTS or cls is tuple or cls in _SETS or cls in _DICTS:
            return self._generic(cls, cls, ())
        if issubclass(cls, enum.Enum):
            return _enum(cls)
        pydantic = sys.modules.get("pydantic")
        if pydantic is not None and _is_model(cls, pydantic):
            return _pydantic(key, pydantic)
        is_record = dataclasses.is_dataclass(cls)
        is_named = issubclass(cls, tuple) and hasattr(cls, "_fields")
        is_typed_dict = typing.is_typeddict(cls)
        if not (is_record or is_named or is_typed_dict):
            return None
        try:
            if key in self.open:
                return self.open[key]  # type: ignore[return-value]  # a _Lazy acts as a _Node
        except TypeError:  # an unhashable annotation
            return None
        lazy = self.open[key] = _Lazy(frozenset({tuple, list} if is_named else {dict}))
        hints = _hints(cls, bound)
        if is_record:
            names = [f.name for f in dataclasses.fields(typing.cast(Any, cls)) if f.init]
            node = _record(cls, _fields(hints, names, self))
        elif is_named:
            node = _named_tuple(cls, _fields(hints, list(cls._fields), self))  # type: ignore[attr-defined]
        else:
            node = _typed_dict(cls, _fields(hints, list(hints), self))
        lazy.node = node
        return node


def _is_model(cls: type, pydantic: Any) -> bool:
    try:
        return issubclass(cls, pydantic.BaseModel)
    except Exception:  # a broken or partial pydantic import
        return False


def _hints(cls: type, bound: dict[Any, Any]) -> dict[str, Any]:
    """A class's field annotations, resolved; a generic's type variables bound."""
    hints = typing.get_type_hints(cls)
    if not bound:
        return hints
    out = {}
    for name, hint in hints.items():
        if isinstance(hint, typing.TypeVar):
            hint = bound.get(hint, Any)
        else:
            params = getattr(hint, "__parameters__", ())
            if params:
                hint = hint[tuple(bound.get(p, Any) for p in params)]
        out[name] = hint
    return out


_lock = threading.Lock()  # guards _compiled; compiling runs once per annotation
_compiled: dict[Any, Shape | None] = {}


def shape_of(annotation: Any) -> Shape | None:
    """The Shape of an annotation; None if values of it travel as they are (no conversion:
    ``Any``, unknown classes). Raises only for annotations whose classes fail to resolve."""
    try:
        found = _compiled.get(annotation, _compiled)
    except TypeError:  # unhashable: not cached
        found = _compiled
    if found is not _compiled:
        return found  # type: ignore[return-value]
    with _lock:
        node = _Compiler()(annotation)
        shape = None if node is None else Shape(annotation, node)
        try:
            if len(_compiled) < 4096:
                _compiled[annotation] = shape
        except TypeError:
            pass
    return shape


class _NoAnnotation:
    def __repr__(self) -> str:
        return "NO_ANNOTATION"


NO_ANNOTATION: Final[Any] = _NoAnnotation()
"""What return_annotation gives for a function without a return annotation."""


def _target(fn: Any) -> Any:
    """The function whose annotation counts: partials and bound methods unwrapped, a callable
    object's ``__call__``."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        else:
            break
    if inspect.isroutine(fn) or hasattr(fn, "__wrapped__") or isinstance(fn, type):
        return fn
    return getattr(type(fn), "__call__", fn)  # noqa: B004


def return_annotation(fn: Any) -> Any:
    """``fn``'s return annotation, resolved (``from __future__ import annotations`` too);
    NO_ANNOTATION if it has none. Only the return annotation is resolved: a parameter's
    that does not resolve (an import under TYPE_CHECKING) does not matter."""
    target = _target(fn)
    try:
        raw = target.__annotations__.get("return", NO_ANNOTATION)
    except Exception:
        return NO_ANNOTATION
    if raw is NO_ANNOTATION or not isinstance(raw, str | typing.ForwardRef):
        return raw
    inner = target
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    holder = types.SimpleNamespace(__annotations__={"return": raw})
    hints = typing.get_type_hints(holder, globalns=getattr(inner, "__globals__", None))
    return hints["return"]


def item_shape(annotation: Any) -> Shape | None:
    """A batch function's per-item Shape: V of its ``Mapping[K, V]`` annotation (async
    functions: their awaited type); None if there is none to use."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in _DICTS and len(args) == 2:
        return shape_of(args[1])
    return None


class _FromAnnotation:
    def __repr__(self) -> str:
        return "<the function's return annotation>"

    def __reduce__(self) -> str:
        return "FROM_ANNOTATION"


FROM_ANNOTATION: Final[Any] = _FromAnnotation()
"""``returns=``'s default: the function's own return annotation decides."""

_log = logging.getLogger("dedupe")
_by_function: dict[Any, Shape | None] = {}  # sf.call's functions' shapes (a bounded cache)


def function_shape(fn: Any, returns: Any = FROM_ANNOTATION, *, batch: bool = False) -> Shape | None:
    """The Shape a flight of ``fn`` uses: ``returns`` if given, else ``fn``'s return
    annotation (for a batch function, its mapping's value type). None: values travel as
    they are. An annotation that does not resolve (a name imported only under
    TYPE_CHECKING) is left alone, with a warning once per function."""
    if returns is not FROM_ANNOTATION:
        return item_shape(returns) if batch else shape_of(returns)
    target = _target(fn)
    try:
        if "return" not in target.__annotations__:
            return None  # the common, unannotated case: no lookup, no cache
        found = _by_function.get((target, batch), _by_function)
    except Exception:
        return None
    if found is not _by_function:
        return found  # type: ignore[return-value]
    try:
        annotation = return_annotation(target)
        shape = item_shape(annotation) if batch else shape_of(annotation)
    except Exception as exc:
        _log.warning(
            "the return annotation of %s does not resolve (%s: %s): its values travel as "
            "they are; pass returns=... to name the type",
            getattr(target, "__qualname__", target),
            type(exc).__name__,
            exc,
        )
        shape = None
    if len(_by_function) >= 4096:
        _by_function.clear()
    _by_function[(target, batch)] = shape
    return shape
