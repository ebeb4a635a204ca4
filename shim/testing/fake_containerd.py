"""A stand-in for containerd's ttrpc events endpoint (``$TTRPC_ADDRESS``): records what is forwarded
and checks containerd's rules (topic syntax, namespace) the way containerd 1.6 does.

``FakeContainerd.decoded()`` gives ``(topic, type_url, message)`` with the event decoded from its
bare type URL, so tests can assert both order and wire form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import empty_pb2

from shim._pb.containerd.events import task_pb2 as events_pb2
from shim._pb.containerd.services.events.ttrpc.v1 import events_pb2 as forward_pb2
from shim.errors import InvalidArgument, Unavailable
from shim.ttrpc import CallContext, Method, Server

SERVICE = "containerd.services.events.ttrpc.v1.Events"
_COMPONENT = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")


@dataclass
class FakeContainerd:
    """``fail_next`` rejects that many Forward calls with UNAVAILABLE first (retry tests)."""

    envelopes: list[forward_pb2.Envelope] = field(default_factory=list)
    metadata: list[dict[str, list[str]]] = field(default_factory=list)
    fail_next: int = 0
    server: Server | None = None

    async def _forward(self, req: forward_pb2.ForwardRequest, ctx: CallContext) -> empty_pb2.Empty:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise Unavailable("fake containerd: try again")
        env = req.envelope
        parts = env.topic.split("/")
        if not env.topic.startswith("/") or not all(_COMPONENT.match(p) for p in parts[1:]):
            raise InvalidArgument(f"envelope topic {env.topic!r}: invalid topic")
        if not env.namespace:
            raise InvalidArgument("namespace is required")
        self.envelopes.append(env)
        self.metadata.append(ctx.metadata)
        return empty_pb2.Empty()

    async def serve(self, path: str) -> None:
        self.server = Server()
        self.server.register(
            SERVICE, {"Forward": Method(forward_pb2.ForwardRequest, empty_pb2.Empty, self._forward)}
        )
        await self.server.serve_unix(path)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    @property
    def topics(self) -> list[str]:
        return [e.topic for e in self.envelopes]

    def decoded(self) -> list[tuple[str, str, Any]]:
        out = []
        for e in self.envelopes:
            name = e.event.type_url.rsplit(".", 1)[-1]
            cls = getattr(events_pb2, name)
            out.append((e.topic, e.event.type_url, cls.FromString(e.event.value)))
        return out


__all__ = ["SERVICE", "FakeContainerd"]
