"""What both drivers share: everything about carrying a command except the waiting itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..backend import Backend
from ..commands import ScriptCall, acquire_call, complete_call, discard_call, parse_acquired
from ..context import Flight, leading
from ..envelope import Codec
from ..errors import BackendUnavailable
from ..keys import Names
from ..protocol import Acquire, Command, Complete, Discard, FlightSpec, Lead
from ..renewal import Lease, LostSignal
from ..signals import Latch, Mailbox

__all__ = ["DriverBase", "local_leader"]


class DriverBase:
    """One flight's plumbing: scripts to run, the subscription, the lease while leading."""

    def __init__(
        self,
        backend: Backend,
        spec: FlightSpec,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.backend = backend
        self.codec: Codec = backend.codec
        self.cluster = backend.kind == "cluster"  # isinstance on cluster clients is slow
        self.spec = spec
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.mailbox: Mailbox[object] | None = None

    def script_for(self, cmd: Command) -> ScriptCall | None:
        """The script a command runs, if it is one of the script commands."""
        if isinstance(cmd, Acquire):
            return acquire_call(self.spec, cmd)
        if isinstance(cmd, Complete):
            return complete_call(self.spec, cmd, self.backend.publish)
        if isinstance(cmd, Discard):
            return discard_call(self.spec, cmd)
        return None

    @staticmethod
    def reply_of(cmd: Command, raw: Any) -> object:
        if isinstance(cmd, Acquire):
            return parse_acquired(raw)
        if isinstance(cmd, Complete):
            return bool(raw)
        return raw

    def subscription(self) -> Latch[bool]:
        """Subscribe (first time) or look up the current subscription (after a RECHECK)."""
        hub = self.backend.hub()
        channel = self.spec.names.channel
        if self.mailbox is None:
            self.mailbox = Mailbox()
            return hub.subscribe(channel, self.mailbox)
        return hub.confirmation(channel)

    def unconfirmed(self) -> BackendUnavailable:
        """The server never confirmed the subscription: reconnect the hub, fail this call."""
        channel = self.spec.names.channel
        self.backend.hub().kick(channel)
        return BackendUnavailable(f"Redis did not confirm the subscription to {channel!r}")

    def release(self) -> None:
        if self.mailbox is not None:
            self.backend.hub().unsubscribe(self.spec.names.channel, self.mailbox)
            self.mailbox = None

    @contextmanager
    def leased(self, cmd: Lead) -> Iterator[None]:
        """Run the body as the leader: lease renewed, current_flight() set, reentry guarded."""
        names = self.spec.names
        lease = Lease(names.job_id, names.lock, cmd.lock_value, self.spec.lock_ttl_ms / 1000)
        renewer = self.backend.renewer()
        renewer.add(lease)
        try:
            with leading(names.channel, Flight(names.job_id, cmd.token, lease.lost)):
                yield
        finally:
            renewer.remove(lease)


@contextmanager
def local_leader(backend: Backend, names: Names) -> Iterator[None]:
    """on_backend_error="local": lead in this process only, with no lease and token 0."""
    backend.ran_locally()
    with leading(names.channel, Flight(names.job_id, 0, LostSignal())):
        yield
