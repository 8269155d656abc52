"""Owner ids of leases: who holds a lock, as its value ``"<token>:<owner>"`` names it.

The owner id of a lease, :func:`format_owner`, is ``<host>/<pid>/<start-ms>/<instance>.<seq>``:
the host and process that lead, when the lease began (Unix ms), the SingleFlight instance
(random, new after a fork) and the flight's number in it. No ``:``, since the lock value is
``<token>:<owner>`` (``dedupe.core.record`` builds and reads that). Each flight's owner id is
unique, so a lease found under it is that flight's own.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Final

from dedupe.core.record import parse_lock

__all__ = ["Holder", "OwnerIds", "format_owner", "parse_owner"]

_UNSAFE: Final = re.compile(r"[:/\s]")


def _host() -> str:
    return _UNSAFE.sub("_", socket.gethostname()) or "localhost"


def format_owner(instance: str, seq: int, *, started_ms: int | None = None) -> str:
    """The owner id of one lease, naming this host and process; see the module docstring.

    ``instance`` identifies the SingleFlight in the process (e.g. 16 random hex digits);
    ``started_ms`` defaults to now. Host names lose any ``:``, ``/`` or white space.
    """
    if not instance or _UNSAFE.search(instance) or "." in instance:
        raise ValueError(f"owner instance must be non-empty, without ':', '/', '.': {instance!r}")
    start = int(time.time() * 1000) if started_ms is None else started_ms
    return f"{_host()}/{os.getpid()}/{start}/{instance}.{seq}"


class OwnerIds:
    """Owner ids for one SingleFlight in one process: ``ids()`` gives the next lease's.

    Host and pid are read once, so make a new one in a forked child (its pid differs).
    Each id costs one clock read and a string format.
    """

    __slots__ = ("_head", "_seq", "instance")

    def __init__(self, instance: str | None = None) -> None:
        self.instance = uuid.uuid4().hex[:16] if instance is None else instance
        format_owner(self.instance, 0)  # validates the instance
        self._head = f"{_host()}/{os.getpid()}/"
        self._seq = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._head}{int(time.time() * 1000)}/{self.instance}.{next(self._seq)}"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease, from the lock value ``"<token>:<owner>"``.

    ``host``, ``pid`` and ``started_ms`` are None for owners in another format (an older
    dedupe's random id); ``owner`` is always the raw owner id.
    """

    token: int
    owner: str
    host: str | None = None
    pid: int | None = None
    started_ms: int | None = None  # Unix time in ms when the lease was taken
    instance: str | None = None
    seq: int | None = None


def parse_owner(lock_value: str | bytes) -> Holder:
    """Parse a lock value ``"<token>:<owner>"``; raises ValueError if it is not one."""
    text = lock_value.decode("utf-8", "replace") if isinstance(lock_value, bytes) else lock_value
    lock = parse_lock(text)
    if lock is None:
        raise ValueError(f"not a dedupe lock value (expected '<token>:<owner>'): {text!r}")
    token, owner = lock
    parts = owner.split("/")
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        instance, dot, seq = parts[3].rpartition(".")
        return Holder(
            token,
            owner,
            host=parts[0],
            pid=int(parts[1]),
            started_ms=int(parts[2]),
            instance=instance if dot else parts[3],
            seq=int(seq) if dot and seq.isdigit() else None,
        )
    return Holder(token, owner)
