"""A fault-injecting TCP proxy on loopback for tests: forwards both ways, can blackhole a link.

``blackhole()`` stops forwarding in both directions but keeps every socket open, as a
half-open partition does: the client's writes succeed and its reads block until its own
timeout. ``heal()`` delivers what was held back, as TCP retransmission would.
``lose_reply_to(marker, n)`` drops the reply to each of the next ``n`` requests that contain
``marker`` (the request itself reaches the server and runs) and leaves that connection
hanging: nothing more is forwarded on it, either way, but its sockets stay open.

With ``count_resp=True`` it parses the RESP2 streams and counts commands and round trips: a
round trip starts whenever the client sends a command while none of its earlier commands on
that connection awaits a reply (so a pipeline of N commands is one round trip, N sequential
calls are N).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

__all__ = ["Proxy"]

_CHUNK = 1 << 20


def _resp_end(buf: bytes | bytearray, pos: int) -> int | None:
    """Offset just past the RESP2 value starting at ``pos``; None if it is incomplete."""
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind = buf[pos : pos + 1]
    if kind in (b"+", b"-", b":"):
        return line_end + 2
    n = int(buf[pos + 1 : line_end])
    if kind == b"$":
        if n < 0:
            return line_end + 2
        end = line_end + 2 + n + 2
        return end if len(buf) >= end else None
    if kind == b"*":
        at: int | None = line_end + 2
        for _ in range(max(0, n)):
            assert at is not None
            at = _resp_end(buf, at)
            if at is None:
                return None
        return at
    raise ValueError(f"not RESP2 at {pos}: {bytes(buf[pos : pos + 20])!r}")


class _Counter:
    """Counts complete RESP values in one direction of one connection."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> int:
        self.buf += data
        pos, count = 0, 0
        while pos < len(self.buf):
            end = _resp_end(self.buf, pos)
            if end is None:
                break
            pos, count = end, count + 1
        del self.buf[:pos]
        return count


class _Link:
    def __init__(self, proxy: Proxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client, self.server = client, server
        self.outstanding = 0  # commands sent, not yet answered (under proxy._lock)
        self.commands, self.replies = _Counter(), _Counter()
        self.lose_next = False  # drop the next reply, then hang (under proxy._lock)
        self.hung = False  # forwards nothing more (under proxy._lock)


class Proxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards each connection to ``target``."""

    def __init__(self, target: tuple[str, int], *, count_resp: bool = False) -> None:
        self.target = target
        self.count_resp = count_resp
        self._lock = threading.Lock()
        self._open = threading.Event()  # set: forwarding; clear: blackholed
        self._open.set()
        self._closed = threading.Event()
        self._links: list[_Link] = []  # under _lock
        self._threads: list[threading.Thread] = []
        self.round_trips = 0  # under _lock
        self.commands = 0  # under _lock
        self.held = 0  # chunks read but held back by the blackhole now (under _lock)
        self._lose_marker = b""  # under _lock
        self._lose_count = 0  # under _lock
        self.lost_replies = 0  # under _lock
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> Proxy:
        self._spawn(self._accept)
        return self

    def blackhole(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def lose_reply_to(self, marker: bytes, n: int = 1) -> None:
        with self._lock:
            self._lose_marker, self._lose_count = marker, n

    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            for s in (link.client, link.server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ---

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            link = _Link(self, client, server)
            with self._lock:
                self._links.append(link)
            self._spawn(self._pump, link, True)
            self._spawn(self._pump, link, False)

    def _pump(self, link: _Link, upstream: bool) -> None:
        src, dst = (link.client, link.server) if upstream else (link.server, link.client)
        while not self._closed.is_set():
            try:
                data = src.recv(_CHUNK)
            except OSError:
                break
            if not data:
                break
            if not self._open.is_set():
                with self._lock:
                    self.held += 1
                while not self._open.wait(0.05):
                    if self._closed.is_set():
                        return
                with self._lock:
                    self.held -= 1
            if self._lost(link, upstream, data):
                continue
            if self.count_resp:
                self._count(link, upstream, data)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _lost(self, link: _Link, upstream: bool, data: bytes) -> bool:
        """True if this chunk is not to be forwarded (lose_reply_to)."""
        with self._lock:
            if link.hung:
                return True
            if upstream:
                if self._lose_count and self._lose_marker in data:
                    self._lose_count -= 1
                    link.lose_next = True
                return False
            if link.lose_next:
                link.lose_next, link.hung = False, True
                self.lost_replies += 1
                return True
            return False

    def _count(self, link: _Link, upstream: bool, data: bytes) -> None:
        with self._lock:
            if upstream:
                n = link.commands.feed(data)
                if n:
                    if link.outstanding == 0:
                        self.round_trips += 1
                    link.outstanding += n
                    self.commands += n
            else:
                link.outstanding -= link.replies.feed(data)
