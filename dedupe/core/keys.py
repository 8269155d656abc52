"""Job ids: key templates, key callables, the canonical digest of bound arguments, Redis names."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import pathlib
import re
import string
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

__all__ = [
    "BatchKeys",
    "KeyBuilder",
    "Names",
    "args_digest",
    "batch_keys",
    "checked_names",
    "function_name",
    "key_builder",
    "module_name",
    "names_for",
    "validate_job_id",
    "validate_prefix",
]

# Longer ids, and ids Redis Cluster would mis-tag or a terminal would mangle, go by digest.
_MAX_PLAIN_ID = 200
_MAX_DEPTH = 64


# Each key of a job is its channel and one of these (Names; the flight's scripts join them
# themselves: a property call each would cost more than the join).
LOCK: Final = ":lock"
TOKEN: Final = ":token"
RESULT: Final = ":result"
ERROR: Final = ":error"


class Names(NamedTuple):
    """The Redis keys and channel of one job; all share one hash tag, hence one cluster slot.

    The keys are the channel and a suffix, made when asked for: every flight holds its job's
    Names while it waits, and four keys kept would cost about 480 bytes of it (issue 23's
    memory per flight); a key is asked for once per script."""

    job_id: str
    channel: str  # P:{J}; each key is the channel and a suffix

    @property
    def lock(self) -> str:
        return self.channel + LOCK

    @property
    def token(self) -> str:
        return self.channel + TOKEN

    @property
    def result(self) -> str:
        return self.channel + RESULT

    @property
    def error(self) -> str:
        """The error mark: a failed run's backoff (stale_if_error)."""
        return self.channel + ERROR

    def described(self) -> dict[str, str]:
        """Every name, by what it names (the inspector's JSON)."""
        return {"job_id": self.job_id, "lock": self.lock, "token": self.token,
                "result": self.result, "channel": self.channel, "error": self.error}  # fmt: skip


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
    return checked_names(prefix, validate_job_id(job_id))


def checked_names(prefix: str, job_id: str) -> Names:
    """``names_for`` of a prefix and a job id already validated (the settings' prefix, an id
    a call has checked): the per-call path, with no checks made twice."""
    # tuple.__new__: what Names(...) runs, without its Python-level __new__.
    return tuple.__new__(Names, (job_id, f"{prefix}:{{{_tag(job_id)}}}"))


# --- canonical encoding of arguments -------------------------------------------------------
#
# A bare key digests only values whose encoding is canonical: equal in every process, and
# distinct for values a function could tell apart. Each encoding starts with a type tag, so
# 1, 1.0, True and "1" are four keys. Nothing is encoded through repr(): a repr may summarise
# (numpy, pandas) or carry an address, and two different values would share a key.


def module_name(module: str) -> str:
    """The name a module goes by in job ids: ``__main__`` also in multiprocessing's spawn and
    forkserver children, which import the parent's main script again as ``__mp_main__``."""
    return "__main__" if module == "__mp_main__" else module


def _qualname(tp: type) -> str:
    return f"{module_name(tp.__module__)}.{tp.__qualname__}"


def _refuse(where: str, obj: object, why: str = "") -> TypeError:
    tp = type(obj)
    return TypeError(
        f"argument {where!r} ({_qualname(tp)}) has no canonical encoding for a bare @sf key"
        f"{': ' + why if why else ''}. Bare keys take None, bool, int, float, str, bytes, "
        "tuples, lists, sets and dicts of them, Enum members, dataclasses and NamedTuples "
        "of them, Decimal, Fraction, complex, UUID, dates, times and paths; for anything "
        "else pass key= (a template such as 'user:{user.id}' or a callable) that says what "
        "identifies the call"
    )


def _seq(tag: str, items: Any, where: str, depth: int) -> str:
    inner = ",".join(_canon(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(items))
    return f"{tag}({inner})"


def _mapping(obj: Any, where: str, depth: int) -> str:
    pairs = sorted(
        f"{_canon(k, f'{where}.keys()', depth + 1)}={_canon(v, f'{where}[{k!r}]', depth + 1)}"
        for k, v in obj.items()
    )
    return f"d({','.join(pairs)})"


def _tz(tz: object, where: str) -> str:
    if tz is None:
        return "-"
    if type(tz) is datetime.timezone:
        return f"tz{tz!r}"
    if type(tz) is zoneinfo.ZoneInfo:
        return f"zi{tz.key}"
    raise _refuse(f"{where}.tzinfo", tz, "only datetime.timezone and zoneinfo.ZoneInfo are")


def _moment(obj: Any, where: str, depth: int) -> str:
    return f"r{_qualname(type(obj))}:{obj.replace(tzinfo=None)!r}|{_tz(obj.tzinfo, where)}"


def _reprs(obj: object, where: str, depth: int) -> str:
    # repr of these exact stdlib types is their full value, the same in every process.
    return f"r{_qualname(type(obj))}:{obj!r}"


def _float(obj: Any, where: str, depth: int) -> str:
    return f"f{obj!r}"


def _bytes(obj: Any, where: str, depth: int) -> str:
    return f"y{bytes(obj).hex()}"


def _str(obj: Any, where: str, depth: int) -> str:
    return f"s{len(obj)}:{obj}"


def _set(obj: Any, where: str, depth: int) -> str:
    return f"S({','.join(sorted(_canon(v, f'{where}{{}}', depth + 1) for v in obj))})"


_Encoder = Callable[[Any, str, int], str]
_EXACT: dict[type, _Encoder] = {
    type(None): lambda obj, where, depth: "N",
    bool: lambda obj, where, depth: "b1" if obj else "b0",
    int: lambda obj, where, depth: f"i{obj}",
    float: _float,
    str: _str,
    bytes: _bytes,
    bytearray: _bytes,
    tuple: lambda obj, where, depth: _seq("t", obj, where, depth),
    list: lambda obj, where, depth: _seq("l", obj, where, depth),
    range: lambda obj, where, depth: f"R{obj.start}:{obj.stop}:{obj.step}",
    set: _set,
    frozenset: _set,
    dict: _mapping,
    collections.OrderedDict: _mapping,
    collections.defaultdict: _mapping,
    collections.Counter: _mapping,
    decimal.Decimal: _reprs,
    fractions.Fraction: _reprs,
    complex: _reprs,
    uuid.UUID: _reprs,
    datetime.date: _reprs,
    datetime.timedelta: _reprs,
    datetime.timezone: _reprs,
    datetime.datetime: _moment,
    datetime.time: _moment,
    zoneinfo.ZoneInfo: lambda obj, where, depth: f"zi{obj.key}",
    pathlib.PurePosixPath: _reprs,
    pathlib.PureWindowsPath: _reprs,
    pathlib.PosixPath: _reprs,
    pathlib.WindowsPath: _reprs,
}
# Subclasses of these are canonical only if they hold no state of their own.
_BASES: tuple[type, ...] = (int, float, str, bytes)


def _canon(obj: object, where: str, depth: int = 0) -> str:
    if depth > _MAX_DEPTH:
        raise TypeError(f"argument {where!r} is nested too deeply to build a stable key")
    tp = type(obj)
    encode = _EXACT.get(tp)
    if encode is not None:
        return encode(obj, where, depth)
    if isinstance(obj, enum.Enum):
        return f"e{_qualname(tp)}.{obj.name}"
    if isinstance(obj, type):
        if "<locals>" in obj.__qualname__:
            raise _refuse(where, obj, "a class defined inside a function has no stable name")
        return f"c{_qualname(obj)}"
    if dataclasses.is_dataclass(obj):
        fields = ",".join(
            f"{f.name}={_canon(getattr(obj, f.name), f'{where}.{f.name}', depth + 1)}"
            for f in dataclasses.fields(obj)
        )
        return f"D{_qualname(tp)}({fields})"
    if isinstance(obj, tuple) and isinstance(getattr(tp, "_fields", None), tuple):
        return _seq(f"T{_qualname(tp)}", obj, where, depth)  # a NamedTuple
    if isinstance(obj, _BASES) and not getattr(obj, "__dict__", None):
        base = next(b for b in tp.__mro__ if b in _EXACT)
        return f"x{_qualname(tp)}:{_EXACT[base](obj, where, depth)}"
    raise _refuse(where, obj)


_MUTABLE = (list, dict, set, bytearray)


def _mutable_part(obj: object, where: str, depth: int = 0) -> str | None:
    """Where a canonical value holds something mutable (e.g. "'runs' (a list)"), else None."""
    if depth > _MAX_DEPTH:
        return None  # _canon already refused anything this deep
    if isinstance(obj, _MUTABLE):
        return f"{where!r} (a {type(obj).__name__})"
    if isinstance(obj, (tuple, frozenset)):
        for i, item in enumerate(obj):
            found = _mutable_part(item, f"{where}[{i}]", depth + 1)
            if found:
                return found
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if not type(obj).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            return f"{where!r} (a dataclass that is not frozen)"
        for f in dataclasses.fields(obj):
            found = _mutable_part(getattr(obj, f.name), f"{where}.{f.name}", depth + 1)
            if found:
                return found
    return None


def args_digest(arguments: Mapping[str, object]) -> str:
    """A digest of bound arguments that is identical in every process and every call form."""
    canon = ";".join(f"{name}={_canon(value, name)}" for name, value in arguments.items())
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# --- what a function is, for its key -----------------------------------------------------------


def function_name(fn: Callable[..., object]) -> str:
    """``module.qualname`` of a function, method, partial or callable object.

    A function of the main script is ``__main__.<qualname>`` in every process, also in
    spawn and forkserver children (where its module is ``__mp_main__``), so that the
    children and the parent share its flights.
    """
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.ismethod(target):
        target = target.__func__
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        qualname, module = type(target).__qualname__, type(target).__module__
    return f"{module_name(module)}.{qualname}"


def _bound_state(fn: Callable[..., object]) -> Callable[[], dict[str, object]]:
    """What ``fn`` carries besides its code and arguments (partial arguments, a bound self,
    closure cells), checked canonical now; the returned function reads it again per call.

    Raises TypeError when that state could not be part of a bare key.
    """
    name = function_name(fn)
    fixed: dict[str, object] = {}
    target: Any = fn
    level = 0
    while isinstance(target, functools.partial):
        fixed[f"@partial{level}.args"] = target.args
        fixed[f"@partial{level}.keywords"] = dict(target.keywords)
        target, level = target.func, level + 1
    if inspect.ismethod(target):
        fixed["@self"] = target.__self__
        target = target.__func__
    if getattr(target, "__name__", None) == "<lambda>":
        raise TypeError(
            f"a bare @sf key cannot tell lambdas apart ({name}): every lambda of a module has "
            "the same name. Use a def, or pass key="
        )
    if not inspect.isfunction(target) and not inspect.isbuiltin(target):
        fixed["@object"] = target  # a callable object: it is its own state
    cells: list[tuple[str, Any]] = []
    code = getattr(target, "__code__", None)
    closure = getattr(target, "__closure__", None) or ()
    if code is not None:
        # __class__ is the cell behind super(); the qualname already names the class.
        cells = [(v, c) for v, c in zip(code.co_freevars, closure, strict=True) if v != "__class__"]

    def state() -> dict[str, object]:
        values = dict(fixed)
        for var, cell in cells:
            try:
                values[f"@{var}"] = cell.cell_contents
            except ValueError:
                raise TypeError(
                    f"{name} is a closure over {var!r}, which is not bound yet; a bare @sf key "
                    "digests the values a closure captures. Pass key="
                ) from None
        return values

    captured = {f"@{var}" for var, _ in cells}
    for where, value in state().items():
        what = "captures" if where in captured else "is bound to"
        try:
            _canon(value, where)
        except TypeError as exc:
            reason = str(exc).replace(f"argument {where!r} ", "", 1)
            raise TypeError(
                f"{name} {what} {where[1:]!r}, which a bare @sf key cannot digest, so two "
                f"such functions would share results: {reason}"
            ) from None
        mutable = _mutable_part(value, where[1:]) if where in captured else None
        if mutable is not None:
            raise TypeError(
                f"{name} captures {where[1:]!r}, and {mutable} can change between calls, so a "
                "bare @sf key over it would not be stable. Capture immutable values only "
                "(tuples, frozensets, frozen dataclasses, scalars), or pass key="
            )
    if not fixed and not cells:
        return dict
    return state


# --- builders -------------------------------------------------------------------------------


P = inspect.Parameter


class KeyBuilder:
    """Turns one call's arguments into its job id."""

    def __init__(
        self,
        fn: Callable[..., object],
        build: Callable[[dict[str, Any]], str],
        by_position: Callable[..., str] | None = None,
        const: str | None = None,
    ):
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
        # Every parameter can come by position: a call that gives them all so needs no more.
        self._by_position = self._simple and self._positional == self._names
        self.count = len(self._names)
        # ``build`` of a call that gives every argument by position, taking them as they
        # come (no dict of them): a template's str.format by position. Only then. ``fast``,
        # ``const`` and ``count`` are public for Flown.run, which takes this usual path inline
        # (a frame less on every call) and calls the builder for anything else.
        self.fast = by_position if self._by_position else None
        # A template without fields names one job whatever the arguments (key="token"): its
        # id is built once, not formatted per call (about 1.4k instructions of a local copy's
        # hit). Used only when the call's arguments fit the signature by position.
        self.const = const if self.fast is not None else None

    def arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, in signature order, defaults applied."""
        if self._by_position and not kwargs and len(args) == self.count:
            return dict(zip(self._names, args))  # noqa: B905 (the lengths are equal)
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
        # The usual call, every argument by position, inline: a call's key is on the path of
        # every call (a local copy's hit is little more than this).
        fast = self.fast
        if fast is not None and not kwargs and len(args) == self.count:
            if self.const is not None:
                return self.const
            try:
                job_id = fast(*args)
            except (AttributeError, KeyError, IndexError):
                job_id = self._build(self.arguments(args, kwargs))  # raises, saying why
        elif self._by_position and not kwargs and len(args) == self.count:
            job_id = self._build(dict(zip(self._names, args)))  # noqa: B905 (equal lengths)
        else:
            job_id = self._build(self.arguments(args, kwargs))
        return job_id if type(job_id) is str and job_id else validate_job_id(job_id)


def _by_position(template: str, head: str, names: list[str]) -> str | None:
    """``head + template`` with each field's argument named by its position in ``names``
    (``"user:{user_id.name!r}"`` -> ``"user:{0.name!r}"``): formatted with the arguments by
    position it gives what ``template.format(**arguments)`` gives. None when a format spec
    nests a field (``{x:{width}}``): those keep the named path."""
    out = [head.replace("{", "{{").replace("}", "}}")]
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if spec and ("{" in spec or "}" in spec):
            return None
        root = re.match(r"[^.\[]*", field)
        name = root.group(0) if root else field
        if name not in names:
            return None
        out.append("{" + str(names.index(name)) + field[len(name) :])
        if conversion:
            out.append("!" + conversion)
        if spec:
            out.append(":" + spec)
        out.append("}")
    return "".join(out)


def _template_fields(template: str) -> list[str]:
    roots = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        root = re.match(r"[^.\[]*", field)
        roots.append(root.group(0) if root else field)
    return roots


def key_builder(
    fn: Callable[..., object],
    key: str | Callable[..., str] | None,
    namespace: bool | str = True,
) -> KeyBuilder:
    """Check a key spec against ``fn`` once, at decoration time, and return its builder.

    Job ids are ``<namespace>:<key>``. The namespace is ``module.qualname`` of ``fn``
    (``namespace=True``), a string of your own, or nothing (``namespace=False``: the key
    alone is the job id, shared with any other function and with ``call()`` using it).
    Without ``key`` the key is a digest of the arguments (and of what ``fn`` captures).
    """
    if isinstance(namespace, bool):
        ns = function_name(fn) if namespace else ""
    elif isinstance(namespace, str) and namespace:
        ns = namespace
    else:
        raise TypeError(f"namespace must be True, False or a non-empty str, not {namespace!r}")
    params = inspect.signature(fn).parameters
    where = function_name(fn)
    if key is None:
        if not ns:
            raise TypeError(
                "namespace=False needs key=: a bare key is a digest of the arguments only, "
                "so every function's calls with equal arguments would share one result"
            )
        state = _bound_state(fn)
        plain = state is dict

        def build_bare(arguments: dict[str, Any]) -> str:
            if plain:
                return f"{ns}:{args_digest(arguments)}"
            return f"{ns}:{args_digest({**arguments, **state()})}"

        return KeyBuilder(fn, build_bare)
    if namespace is True and getattr(_innermost(fn), "__name__", None) == "<lambda>":
        raise TypeError(
            f"every lambda of a module has one name ({where}), so its keys cannot be "
            "namespaced by it: use a def, or pass namespace='<a name of your own>' (or "
            "namespace=False to share the key with other functions)"
        )
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
        head = f"{ns}:" if ns else ""

        def build_from_template(arguments: dict[str, Any]) -> str:
            try:
                return head + template.format(**arguments)
            except (AttributeError, KeyError, IndexError) as exc:
                raise TypeError(f"key template {template!r} failed for {where}: {exc}") from exc

        positional = _by_position(template, head, list(params))
        fast = None if positional is None else positional.format
        const = head + template.format() if not _template_fields(template) else None
        return KeyBuilder(fn, build_from_template, fast, const)
    if callable(key):
        build = _callable_key(fn, key, where, params)
        if not ns:
            return KeyBuilder(fn, build)
        return KeyBuilder(fn, lambda arguments: f"{ns}:{build(arguments)}")
    raise TypeError(f"key must be a str template, a callable or None, not {type(key).__name__}")


def _innermost(fn: Callable[..., object]) -> Any:
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    return target.__func__ if inspect.ismethod(target) else target


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


# --- batches ---------------------------------------------------------------------------------


class BatchKeys:
    """Turns one batch call's arguments into its items (in order, duplicates collapsed) and
    each item's job id."""

    def __init__(
        self,
        fn: Callable[..., object],
        build: Callable[[Any, dict[str, Any]], str],
        collection: str,
    ) -> None:
        self._arguments = KeyBuilder(fn, lambda arguments: "").arguments
        self._build = build
        self.collection = collection  # the name of the parameter that holds the items

    def items(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """The call's items and its other arguments by name."""
        arguments = self._arguments(args, kwargs)
        given = arguments.pop(self.collection)
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise TypeError(
                f"the items ({self.collection!r}) must be a collection of items, not "
                f"{type(given).__name__}"
            )
        try:
            items = list(dict.fromkeys(given))
        except TypeError as exc:
            raise TypeError(f"the items of a batch must be hashable: {exc}") from None
        return items, arguments

    def job_id(self, item: Any, others: dict[str, Any]) -> str:
        return validate_job_id(self._build(item, others))


def batch_keys(
    fn: Callable[..., object],
    key: str | Callable[[Any], str] | None,
    namespace: bool | str = True,
) -> BatchKeys:
    """Check a batch's key spec against ``fn`` once, at decoration time (see key_builder).

    ``fn``'s first parameter (after ``self`` or ``cls``) takes the collection of items. A
    template names ``{item}`` (attributes and indexing work) and any of ``fn``'s other
    parameters; a callable takes one item. Job ids are ``<namespace>:<key>`` as for
    ``@sf``, so a batch and a single-key function with the same namespace and key share
    them. Without ``key``, an item's key is a digest of it and the other arguments.
    """
    if isinstance(namespace, bool):
        ns = function_name(fn) if namespace else ""
    elif isinstance(namespace, str) and namespace:
        ns = namespace
    else:
        raise TypeError(f"namespace must be True, False or a non-empty str, not {namespace!r}")
    params = list(inspect.signature(fn).parameters.values())
    where = function_name(fn)
    skip = 1 if params and params[0].name in ("self", "cls") else 0
    if len(params) <= skip or params[skip].kind not in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"a batch function takes the collection of items first: {where} does not")
    collection = params[skip].name
    others = {p.name for p in params} - {collection}
    head = f"{ns}:" if ns else ""
    if key is None:
        if not ns:
            raise TypeError("namespace=False needs key=: a bare key is a digest of the item")

        def build_bare(item: Any, arguments: dict[str, Any]) -> str:
            return f"{head}{args_digest({**arguments, collection: item})}"

        return BatchKeys(fn, build_bare, collection)
    if isinstance(key, str):
        if not key:
            raise ValueError("key template must not be empty")
        for name in _template_fields(key):
            if name != "item" and name not in others:
                raise TypeError(
                    f"key template {key!r} names {name!r}: a batch's template takes {{item}} "
                    f"and the other arguments of {where}"
                )
        template = key

        def build_from_template(item: Any, arguments: dict[str, Any]) -> str:
            try:
                return head + template.format(**arguments, item=item)
            except (AttributeError, KeyError, IndexError) as exc:
                raise TypeError(f"key template {template!r} failed for {where}: {exc}") from exc

        return BatchKeys(fn, build_from_template, collection)
    if callable(key):

        def build_from_callable(item: Any, arguments: dict[str, Any]) -> str:
            job_id = key(item)
            if not isinstance(job_id, str):
                raise TypeError(f"key callable for {where} returned {type(job_id).__name__}")
            return head + job_id

        return BatchKeys(fn, build_from_callable, collection)
    raise TypeError(f"key must be a str template, a callable or None, not {type(key).__name__}")
