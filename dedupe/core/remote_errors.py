"""Exceptions as data: a leader's exception as plain metadata, and back in every follower.

The leader sends its exception's type, module, args, bases, message, formatted traceback and
frames, encoded by the safe serializer (and, with pickle under a secret, the pickled
exception when it round-trips). A follower rebuilds the original class if it is already
imported and rebuilds from its args; else the nearest imported base class, naming the
leader's type; else ``RemoteError``. Nothing is imported, and no module ``__getattr__`` or
descriptor runs, on the follower's side; tblib rebuilds the traceback from plain strings.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
import types
from collections import deque
from typing import Any, Final

import cloudpickle
from tblib import Traceback

from dedupe.core.serializers import SAFE, qualname, safe_str, tagged
from dedupe.errors import EnvelopeError, RemoteError

__all__ = ["error_body", "error_from_meta"]

_MAX_FRAMES: Final = 100  # leader traceback frames carried (the innermost ones)
_MAX_TEXT: Final = 64_000  # characters of formatted traceback carried


def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 4
    return text[:head] + "\n[... dedupe cut this text ...]\n" + text[-(limit - head) :]


def _frames(tb: types.TracebackType | None) -> list[list[Any]]:
    """The traceback as [file, function, line] rows: data, rebuilt with tblib on arrival."""
    rows: deque[list[Any]] = deque(maxlen=_MAX_FRAMES)
    while tb is not None:
        code = tb.tb_frame.f_code
        rows.append([code.co_filename, code.co_name, tb.tb_lineno])
        tb = tb.tb_next
    return list(rows)


def _traceback_of(frames: Any) -> types.TracebackType | None:
    if type(frames) is not list or not frames or len(frames) > _MAX_FRAMES:
        return None
    node: dict[str, Any] | None = None
    for row in reversed(frames):
        if type(row) is not list or len(row) != 3:
            return None
        file, name, line = row
        if type(file) is not str or type(name) is not str or type(line) is not int:
            return None
        if not 0 <= line < 2**31:
            return None
        # Only these plain strings and ints reach tblib: no globals or locals from the data.
        node = {
            "tb_frame": {
                "f_globals": {"__file__": file, "__name__": "dedupe.leader"},
                "f_locals": {},
                "f_code": {"co_filename": file, "co_name": name},
                "f_lineno": line,
            },
            "tb_lineno": line,
            "tb_next": node,
        }
    try:
        return Traceback.from_dict(node).as_traceback()  # type: ignore[no-any-return]
    except Exception:
        return None


def _imported_class(module: Any, qualname: Any) -> type[Exception] | None:
    """The Exception subclass at module.qualname if that module is already imported.

    Plain dictionary lookups only: no import, no module ``__getattr__``, no descriptors.
    """
    if type(module) is not str or type(qualname) is not str:
        return None
    try:
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            if isinstance(obj, types.ModuleType):
                namespace = object.__getattribute__(obj, "__dict__")
            elif isinstance(obj, type):
                namespace = type.__getattribute__(obj, "__dict__")  # past any metaclass hooks
            else:
                return None
            obj = namespace.get(part)
        if isinstance(obj, type) and issubclass(obj, Exception):
            return obj
    except Exception:
        return None
    return None


def _rebuilt(cls: type[Exception], args: tuple[Any, ...], message: str) -> Exception | None:
    """``cls(*args)`` if that rebuilds it faithfully (same type, args and message)."""
    try:
        exc = cls(*args)
        if type(exc) is cls and exc.args == args and safe_str(exc) == message:
            return exc
    except Exception:
        pass
    return None


def _stand_in(cls: type[Exception], text: str) -> Exception | None:
    try:
        exc = cls(text)
        return exc if type(exc) is cls else None
    except Exception:
        return None


def _pickled_exception(exc: BaseException) -> bytes | None:
    """The exception pickled, if it unpickles as its own class (checked here, on the leader)."""
    try:
        data: bytes = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        back = pickle.loads(data)
    except Exception:
        return None
    return data if type(back) is type(exc) else None


def _error_meta(exc: BaseException, *, with_pickle: bool) -> dict[str, Any]:
    tp = type(exc)
    try:
        args: Any = tuple(exc.args)
        tagged(args)
    except Exception:
        args = None
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = f"{qualname(tp)}: {safe_str(exc)}"
    meta: dict[str, Any] = {
        "type": qualname(tp),
        "module": tp.__module__,
        "name": tp.__qualname__,
        "message": safe_str(exc),
        "args": args,
        "mro": [
            [c.__module__, c.__qualname__]
            for c in tp.__mro__[1:17]
            if issubclass(c, Exception) and c is not Exception
        ],
        "traceback": _clip(text, _MAX_TEXT),
        "frames": _frames(exc.__traceback__),
        "origin": _origin(),
    }
    if with_pickle and isinstance(exc, Exception):
        meta["pickle"] = _pickled_exception(exc)
    return meta


def error_body(exc: BaseException, *, with_pickle: bool) -> bytes:
    try:
        return SAFE.dumps(_error_meta(exc, with_pickle=with_pickle))
    except Exception:  # an exception type with odd names or text: send what is certain
        meta = {"type": qualname(type(exc)), "message": safe_str(exc), "origin": _origin()}
        return SAFE.dumps({k: str(v) for k, v in meta.items()})


def error_from_meta(meta: Any, *, allow_pickle: bool) -> BaseException:
    if type(meta) is not dict:
        raise EnvelopeError("malformed error record: not a mapping")
    type_name = meta.get("type")
    message = meta.get("message", "")
    remote_tb = meta.get("traceback", "")
    origin = meta.get("origin", "?")
    if not (
        type(type_name) is str
        and type(message) is str
        and type(remote_tb) is str
        and type(origin) is str
    ):
        raise EnvelopeError("malformed error record: type, message and traceback must be text")
    error: Exception | None = None
    pickled = meta.get("pickle")
    if allow_pickle and type(pickled) is bytes:
        try:
            candidate = pickle.loads(pickled)
        except Exception:
            candidate = None
        # Leaders never ship aborts (KeyboardInterrupt, SystemExit, CancelledError): refuse them.
        if isinstance(candidate, Exception):
            error = candidate
    if error is None:
        cls = _imported_class(meta.get("module"), meta.get("name"))
        args = meta.get("args")
        if cls is not None and type(args) is tuple:
            error = _rebuilt(cls, args, message)
    if error is None:
        mro = meta.get("mro")
        for row in mro[:16] if type(mro) is list else ():
            if type(row) is not list or len(row) != 2:
                continue
            base = _imported_class(row[0], row[1])
            if base is not None and base is not Exception:
                error = _stand_in(base, f"{type_name}: {message}")
                if error is not None:
                    break
    if error is None:
        error = RemoteError(type_name, message, remote_tb)
    tb = _traceback_of(meta.get("frames"))
    if tb is not None:
        error = error.with_traceback(tb)
    if hasattr(error, "add_note"):
        error.add_note(f"(raised by the dedupe leader at {origin[:200]})")
    return error
