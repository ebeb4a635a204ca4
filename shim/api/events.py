"""Publishing task events to containerd: ttrpc ``containerd.services.events.ttrpc.v1.Events/Forward``
at ``$TTRPC_ADDRESS`` (what the Go shim library does on 1.6, 1.7 and 2.x).

One queue and one forwarder task: events leave in exactly the order ``publish`` was called, so the
service's create -> start -> exit -> delete order survives. A failed Forward is retried *in place*
(bounded attempts, linear backoff, a new connection after the old one closed — e.g. containerd was
restarted) before the next event is sent; Go's publisher requeues at the tail instead, which can
reorder. Counters ``published`` / ``failed`` / ``dropped`` say what happened; ``on_result(ok)`` (the
shim's metrics) hears each outcome as it happens (a dropped event is a failed one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from google.protobuf import empty_pb2

from shim._pb.containerd.services.events.ttrpc.v1 import events_pb2
from shim.api import translate
from shim.errors import InvalidArgument, ShimError
from shim.log import get_logger
from shim.service.events import TaskEvent
from shim.ttrpc import Client

log = get_logger(__name__)

SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"

Connector = Callable[[str], Awaitable[Client]]


async def _connect(address: str) -> Client:
    return await Client.connect_unix(address, timeout=5.0)


class EventPublisher:
    """Implements ``shim.service.events.EventSink``.

    State: the queue is filled by ``publish`` (event loop) and drained only by the forwarder task;
    the client connection belongs to the forwarder.
    """

    def __init__(
        self,
        *,
        address: str | None,
        namespace: str,
        max_queue: int = 2048,
        attempts: int = 5,
        backoff: float = 1.0,
        call_timeout: float = 5.0,
        connector: Connector = _connect,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        """``address``: containerd's ttrpc socket path (``$TTRPC_ADDRESS``); ``None`` = log only."""
        self.address = address
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.Envelope] = asyncio.Queue(max_queue)
        self._attempts = attempts
        self._backoff = backoff
        self._call_timeout = call_timeout
        self._connector = connector
        self._on_result = on_result
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.failed = 0
        self.dropped = 0

    def publish(self, event: TaskEvent) -> None:
        topic, any_msg = translate.event_any(event)
        envelope = events_pb2.Envelope(namespace=self.namespace, topic=topic, event=any_msg)
        envelope.timestamp.FromDatetime(datetime.now(UTC))
        log.debug("event", topic=topic, type=any_msg.type_url)
        if self.address is None:
            return
        try:
            self._queue.put_nowait(envelope)
        except asyncio.QueueFull:
            self.dropped += 1
            self._result(False)
            log.error("event dropped: queue full", topic=topic, dropped=self.dropped)

    def start(self) -> None:
        """Start the forwarder task (idempotent; a no-op without an address)."""
        if self.address is not None and self._task is None:
            self._task = asyncio.create_task(self._forward_loop(), name="event-forwarder")

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 -- drain budget, not a call deadline
        """Give queued events up to ``timeout`` seconds to go out, then stop the forwarder."""
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            except TimeoutError:
                log.warning("events not delivered before exit", pending=self._queue.qsize())
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _result(self, ok: bool) -> None:
        if self._on_result is not None:
            self._on_result(ok)

    async def _forward_loop(self) -> None:
        while True:
            envelope = await self._queue.get()
            try:
                await self._forward(envelope)
            finally:
                self._queue.task_done()

    async def _forward(self, envelope: events_pb2.Envelope) -> None:
        assert self.address is not None
        req = events_pb2.ForwardRequest(envelope=envelope)
        for attempt in range(1, self._attempts + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await self._connector(self.address)
                await self._client.call(
                    SERVICE,
                    "Forward",
                    req,
                    empty_pb2.Empty,
                    timeout=self._call_timeout,
                    metadata={NAMESPACE_METADATA_KEY: self.namespace},
                )
                self.published += 1
                self._result(True)
                return
            except InvalidArgument as exc:
                # containerd rejected the envelope itself (topic, namespace): retrying cannot help.
                self.failed += 1
                self._result(False)
                log.error("event rejected", topic=envelope.topic, error=str(exc))
                return
            except ShimError as exc:
                log.warning("event forward failed", topic=envelope.topic, attempt=attempt, error=str(exc))
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                if attempt < self._attempts:
                    await asyncio.sleep(self._backoff * attempt)
        self.failed += 1
        self._result(False)
        log.error("event lost", topic=envelope.topic, attempts=self._attempts, failed=self.failed)


__all__ = ["NAMESPACE_METADATA_KEY", "SERVICE", "EventPublisher"]
