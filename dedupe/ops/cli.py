"""The ``dedupe`` command line (``python -m dedupe``, ``dedupe-flight``): see what is in flight.

Commands: ``ls``, ``inspect JOB``, ``forget JOB``, ``watch``. Every one but ``forget`` only
reads. The Redis URL comes from ``--url``, else ``DEDUPE_REDIS_URL``, else
``redis://localhost:6379/0`` (the library's default); ``redis+cluster://`` and
``redis+sentinel://`` URLs work as they do for SingleFlight.

Exit status: 0 done, 1 Redis could not be reached or refused us, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

import redis
import redis.exceptions

from dedupe import __version__
from dedupe.backend.topology import parse_url
from dedupe.core.keys import validate_prefix
from dedupe.ops.inspector import JobState, forget, inspect, scan

__all__ = ["main"]

DEFAULT_URL: Final = "redis://localhost:6379/0"
_PASSWORD: Final = re.compile(r"(//[^/@]*?:)[^/@]*@")


class _Failure(Exception):
    """A failure to report in one line, with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _redact(url: str) -> str:
    return _PASSWORD.sub(r"\1***@", url)


def _connect(url: str, timeout: float) -> Any:
    try:
        target = parse_url(url)
    except ValueError as exc:
        raise _Failure(str(exc), 2) from exc
    if target.kind == "memory":  # its store lives in the process that uses it, not here
        raise _Failure(f"{url}: a memory:// store lives inside its own process; nothing to read", 2)
    opts = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "client_name": "dedupe-cli",
    }
    client = target.client(opts, to_async=False)
    client.ping()  # fail here, with one clear message, rather than halfway through
    return client


def _ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.1f}s"


def _when(started_ms: int | None, now_ms: int) -> str:
    if started_ms is None:
        return "?"
    stamp = datetime.datetime.fromtimestamp(started_ms / 1000, datetime.timezone.utc)
    return f"{stamp:%Y-%m-%d %H:%M:%S}.{started_ms % 1000:03d} UTC ({_ms(now_ms - started_ms)} ago)"


def _holder_text(state: JobState) -> str:
    h = state.holder
    if h is None:
        return f"unreadable:{state.unreadable_lock!r}" if state.unreadable_lock else "-"
    if h.host is None:
        return h.owner
    return f"{h.host}/{h.pid}"


def _kept_text(state: JobState) -> str:
    k = state.kept
    if k is None:
        return "-"
    if state.backoff_ms is not None:
        return f"{k.kind} backing off {_ms(state.backoff_ms)}"
    if k.state == "fresh":
        return f"{k.kind} {_ms(k.fresh_ms)}"
    if k.state == "stale":
        return f"{k.kind} stale +{_ms(k.stale_ms)}"
    return f"{k.kind} (grace)"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


_HEADER: Final = ["JOB", "HOLDER", "TOKEN", "LEASE", "KEPT", "SUBS"]


def _row(state: JobState) -> list[str]:
    return [
        state.job_id,
        _holder_text(state),
        str(state.holder.token) if state.holder else "-",
        _ms(state.lease_ms),
        _kept_text(state),
        str(state.subscribers),
    ]


def _as_json(state: JobState) -> dict[str, Any]:
    data = dataclasses.asdict(state)
    data["names"] = state.names.described()
    data["in_flight"] = state.in_flight
    return data


def _states(client: Any, prefix: str) -> list[JobState]:
    return [inspect(client, prefix, job) for job in scan(client, prefix)]


def cmd_ls(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    states = _states(client, args.prefix)
    if args.json:
        json.dump([_as_json(s) for s in states], out, indent=2)
        out.write("\n")
        return 0
    if not states:
        out.write(f"no flights or kept outcomes under prefix {args.prefix!r}\n")
        return 0
    _table([_HEADER, *(_row(s) for s in states)], out)
    return 0


def cmd_inspect(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    state = inspect(client, args.prefix, args.job)
    if args.json:
        json.dump(_as_json(state), out, indent=2)
        out.write("\n")
        return 0
    now_ms = int(time.time() * 1000)
    n = state.names
    lines = [
        ("job", state.job_id),
        ("keys", f"{n.lock}, {n.result}, {n.token}; channel {n.channel}"),
    ]
    h = state.holder
    if h is not None:
        if h.host is not None:
            who = f"host {h.host}, pid {h.pid}, lease taken {_when(h.started_ms, now_ms)}"
            lines.append(("holder", f"{who}, owner {h.owner}"))
        else:
            lines.append(("holder", f"owner {h.owner} (no host/pid: an older dedupe's id)"))
        lines.append(("token", str(h.token)))
        lines.append(("lease left", _ms(state.lease_ms)))
    elif state.unreadable_lock is not None:
        lines.append(("holder", f"a lock value dedupe did not write: {state.unreadable_lock!r}"))
        lines.append(("lease left", _ms(state.lease_ms)))
    else:
        lines.append(("holder", "none (no lease: nobody runs it now)"))
    counter = state.token_counter
    newest = "-" if counter is None else f"{counter} (the newest token handed out)"
    lines.append(("counter", newest))
    k = state.kept
    if k is None:
        lines.append(("kept", "nothing"))
    else:
        if k.state == "fresh":
            served = f"fresh: served to new callers for {_ms(k.fresh_ms)} more"
        elif k.state == "stale":
            served = (
                f"stale for {_ms(k.stale_ms)}: served only within the callers' "
                "stale_while_revalidate / stale_if_error windows"
            )
        else:
            served = "no longer served to new callers (kept only for its own waiters)"
        lines.append(
            (
                "kept",
                f"{k.kind} of token {k.token}, {k.size} bytes, written {_ms(k.age_ms)} ago, "
                f"{served}; keep {_ms(k.keep_ms)}, ttl {_ms(k.ttl_ms)}",
            )
        )
    if state.refreshing:
        lines.append(("refresh", "the lease refreshes the kept value, served meanwhile"))
    if state.backoff_ms is not None:
        lines.append(
            (
                "backing off",
                f"{_ms(state.backoff_ms)} more: a run failed and the stale value stands in "
                "(stale_if_error); no run starts until then",
            )
        )
    lines.append(("subscribers", f"{state.subscribers} (processes waiting on its channel)"))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        out.write(f"{name.ljust(width)}  {value}\n")
    return 0


def cmd_forget(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    if forget(client, args.prefix, args.job):
        out.write(f"forgot the kept outcome of {args.job!r}\n")
    else:
        out.write(f"nothing kept for {args.job!r}\n")
    return 0


class _Watch:
    """What watch remembers between frames, to tell new leases and takeovers apart."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}  # job -> lease token at the last frame
        self.started = 0
        self.takeovers = 0
        self.frames = 0

    def frame(self, states: list[JobState], interval: float, prefix: str, limit: int) -> str:
        leases = {s.job_id: s for s in states if s.holder is not None}
        new = 0
        for job, state in leases.items():
            assert state.holder is not None
            token, before = state.holder.token, self.seen.get(job)
            if before != token:
                new += 1
                kept = state.kept.token if state.kept else 0
                # A newer lease while the older one left no outcome: its leader died.
                if before is not None and kept < before:
                    self.takeovers += 1
        first = self.frames == 0
        self.frames += 1
        self.started += 0 if first else new
        self.seen = {job: s.holder.token for job, s in leases.items() if s.holder}
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        rate = "-" if first else f"{new / interval:.1f}/s"
        waiting = sum(s.subscribers for s in states)
        kept = sum(1 for s in states if s.kept is not None and s.kept.fresh_ms)
        lines = [
            f"dedupe watch  prefix {prefix!r}  {stamp} UTC  every {interval:g}s",
            f"in flight {len(leases)}   new leases {rate}   kept {kept}   "
            f"waiting processes {waiting}   takeovers seen {self.takeovers}",
            "",
        ]
        out: list[list[str]] = [_HEADER]
        shown = sorted(states, key=lambda s: (s.holder is None, -(s.subscribers), s.job_id))
        out.extend(_row(s) for s in shown[:limit])
        widths = [max(len(row[i]) for row in out) for i in range(len(_HEADER))]
        for row in out:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if len(states) > limit:
            lines.append(f"... and {len(states) - limit} more")
        return "\n".join(lines) + "\n"


def cmd_watch(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    watch = _Watch()
    clear = out.isatty() and not args.once
    end = None if args.duration is None else time.monotonic() + args.duration
    while True:
        text = watch.frame(_states(client, args.prefix), args.interval, args.prefix, args.limit)
        out.write(("\x1b[H\x1b[2J" if clear else "") + text)
        out.flush()
        if args.once or (end is not None and time.monotonic() + args.interval > end):
            return 0
        if not clear:
            out.write("\n")
        time.sleep(args.interval)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="Redis URL (default: $DEDUPE_REDIS_URL, else redis://localhost:6379/0)",
    )
    common.add_argument(
        "--prefix", default=argparse.SUPPRESS, help="the SingleFlight's key prefix (dedupe)"
    )
    common.add_argument(
        "--timeout",
        type=_positive,
        default=argparse.SUPPRESS,
        help="connect and reply timeout in seconds (2)",
    )
    parser = argparse.ArgumentParser(
        prog="dedupe",
        description="See and steer dedupe's flights in Redis. Only 'forget' writes.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"dedupe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("ls", parents=[common], help="list jobs with a lease or a kept outcome")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_ls)
    p = sub.add_parser("inspect", parents=[common], help="show one job's state in Redis")
    p.add_argument("job", metavar="JOB", help="the job id (or the #... tag 'ls' shows)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("forget", parents=[common], help="drop a job's kept outcome (writes)")
    p.add_argument("job", metavar="JOB", help="the job id (or the #... tag 'ls' shows)")
    p.set_defaults(run=cmd_forget)
    p = sub.add_parser("watch", parents=[common], help="a live view of the flights in Redis")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--once", action="store_true", help="print one frame and exit")
    group.add_argument("--duration", type=_positive, help="stop after this many seconds")
    p.add_argument("--interval", type=_positive, default=1.0, help="seconds between frames (1)")
    p.add_argument("--limit", type=_count, default=20, help="rows to show (20)")
    p.set_defaults(run=cmd_watch)
    return parser


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.rstrip(".")


def _auth_problem(url: str, exc: BaseException) -> str:
    text = _describe(exc)
    if "@" not in url.partition("//")[2].split("/")[0]:
        return (
            "it requires a password and the URL gives none "
            "(redis://:PASSWORD@host:port/db, or redis://USER:PASSWORD@...)"
        )
    return f"wrong user name or password ({text})"


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    stream = sys.stdout if out is None else out
    url = getattr(args, "url", None) or os.environ.get("DEDUPE_REDIS_URL") or DEFAULT_URL
    args.prefix = getattr(args, "prefix", "dedupe")
    timeout = getattr(args, "timeout", 2.0)
    where = _redact(url)
    run: Callable[[Any, argparse.Namespace, TextIO], int] = args.run
    client: Any = None
    try:
        validate_prefix(args.prefix)  # before connecting: a usage error, not a Redis one
        client = _connect(url, timeout)
        return run(client, args, stream)
    except _Failure as exc:
        print(f"dedupe: error: {exc}", file=sys.stderr)
        return exc.status
    except ValueError as exc:  # a bad prefix or job id
        print(f"dedupe: error: {exc}", file=sys.stderr)
        return 2
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        print(
            f"dedupe: error: Redis at {where} refused us: {_auth_problem(url, exc)}",
            file=sys.stderr,
        )
        return 1
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            print(f"dedupe: error: Redis at {where} refused us: {_describe(exc)}", file=sys.stderr)
        else:
            print(f"dedupe: error: Redis at {where} answered: {_describe(exc)}", file=sys.stderr)
        return 1
    except (redis.exceptions.RedisError, OSError) as exc:
        print(f"dedupe: error: cannot reach Redis at {where}: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:
                pass  # exiting anyway
