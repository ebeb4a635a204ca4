"""ttrpc client: concurrent unary calls multiplexed over one connection.

Stream ids are odd, starting at 1, +2 per call (as the Go client). ``connect_unix`` connections are
served by an ``asyncio.Protocol`` that matches responses to pending calls as bytes arrive (no read
task, no task per call); ``from_stream`` ones by one read task. Each request frame is one transport
write, so frames never interleave; a caller waits for the write buffer to drain only when the
transport asks for it (flow control). When the connection breaks — EOF, a read error, an
oversized or undecodable frame from the peer — every pending call fails with
``shim.errors.Unavailable`` and so does every later call: make a new client to reconnect.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from shim._pb.ttrpc import request_pb2
from shim.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable, from_status
from shim.log import get_logger
from shim.ttrpc import _wire
from shim.ttrpc._wire import READ_CHUNK, close_writer, frame_bytes, metadata_to_wire
from shim.ttrpc.codec import MAX_MESSAGE_SIZE, MAX_STREAM_ID, Frame, FrameDecoder, FrameType, ProtocolError

log = get_logger(__name__)

_REQUEST = FrameType.REQUEST.value
_RESPONSE = FrameType.RESPONSE.value

M = TypeVar("M", bound=Message)


class Client:
    """A ttrpc connection. Use from one event loop; ``call`` may run concurrently from many tasks.

    State: ``_pending`` (stream id -> future of the Response) is owned by the event loop; incoming
    bytes (``_feed``, called by the protocol or the stream read task) resolve entries, ``call`` adds
    and removes its own. Each frame goes out in one transport write, so frames never interleave.
    """

    # Set in ``__init__`` (stream transport); None on the protocol path, which the protocol feeds.
    _read_task: asyncio.Task[None] | None

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        """Prefer ``connect_unix`` / ``from_stream``. Needs a running event loop."""
        self._setup(max_message_size)
        self._reader: asyncio.StreamReader | None = reader
        self._writer: asyncio.StreamWriter | None = writer
        self._protocol: _ClientProtocol | None = None
        self._transport: asyncio.WriteTransport = writer.transport  # type: ignore[assignment]
        self._read_task = asyncio.create_task(self._read_loop(), name="ttrpc-client-read")

    def _setup(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_message_size)
        self._pending: dict[int, asyncio.Future[request_pb2.Response]] = {}
        self._next_id = 1
        self._closed = asyncio.Event()
        self._is_closed = False
        self._close_reason = "connection closed"
        self._read_task = None

    @classmethod
    def _over_protocol(cls, protocol: _ClientProtocol, max_message_size: int) -> Client:
        self = cls.__new__(cls)
        self._setup(max_message_size)
        self._reader = self._writer = None
        self._protocol = protocol
        assert protocol.transport is not None
        self._transport = protocol.transport
        protocol.client = self
        return self

    @classmethod
    async def connect_unix(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 -- part of the API contract
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> Client:
        """Connect to the ttrpc server at unix socket ``path`` (a ``unix://`` prefix is accepted).

        Raises ``shim.errors.Unavailable`` if nothing accepts the connection within ``timeout``.
        """
        p = os.fspath(path)
        if p.startswith("unix://"):
            p = p[len("unix://") :]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _transport, protocol = await loop.create_unix_connection(_ClientProtocol, p)
        except TimeoutError as exc:
            raise Unavailable(f"ttrpc connect to {p}: timed out after {timeout}s", path=p) from exc
        except OSError as exc:
            raise Unavailable(f"ttrpc connect to {p}: {exc}", path=p) from exc
        return cls._over_protocol(protocol, max_message_size)

    @classmethod
    def from_stream(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> Client:
        """A client over an already-open stream (e.g. the virtio-serial port's unix socket)."""
        return cls(reader, writer, max_message_size=max_message_size)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed or broken; calls then fail with ``Unavailable``."""
        return self._is_closed

    async def wait_closed(self) -> None:
        """Return when the connection has closed for any reason (peer gone, broken, ``close()``)."""
        await self._closed.wait()

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- also sent to the server as timeout_nano
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> M:
        """One unary call; ``timeout`` (seconds) bounds the whole call and is sent as ``timeout_nano``.

        Raises:
            shim.errors.ResourceExhausted: the request is larger than ``max_message_size`` (not sent).
            shim.errors.DeadlineExceeded: no answer within ``timeout``; a late answer is dropped.
            shim.errors.Unavailable: the connection is closed or broke before the answer came.
            shim.errors.Internal: the response payload does not decode as ``response_type``.
            shim.errors.ShimError: the server's status, via ``shim.errors.from_status``.
        """
        if self._is_closed:
            raise Unavailable(f"ttrpc {service}/{method}: {self._close_reason}")
        has_timeout = timeout is not None and timeout > 0
        body = request_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if has_timeout else 0,  # type: ignore[operator]
            metadata=metadata_to_wire(metadata) if metadata else None,
        ).SerializeToString()
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise ResourceExhausted("ttrpc stream ids exhausted on this connection; reconnect")
        if len(body) > self.max_message_size:
            n, limit = len(body), self.max_message_size
            raise ResourceExhausted(
                f"message length {n} exceeds maximum message size of {limit}", length=n, max_size=limit
            )
        self._next_id = sid + 2
        loop = self._loop
        fut: asyncio.Future[request_pb2.Response] = loop.create_future()
        self._pending[sid] = fut
        deadline = None
        timer = None
        if timeout is not None:
            # A timer on the future instead of asyncio.timeout(): same effect, a fraction of the cost.
            deadline = loop.time() + timeout
            timer = loop.call_at(deadline, _expire, fut)
        try:
            transport = self._transport
            if transport.is_closing():
                raise Unavailable(f"ttrpc {service}/{method}: {self._close_reason}")
            transport.write(frame_bytes(sid, _REQUEST, body))
            if self._must_drain():
                async with asyncio.timeout_at(deadline):
                    await self._drain(f"{service}/{method}")
            resp = await fut
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"ttrpc {service}/{method}: no response within {timeout}s", service=service, method=method
            ) from exc
        finally:
            self._pending.pop(sid, None)
            if timer is not None:
                timer.cancel()
        if resp.HasField("status") and resp.status.code != 0:
            raise from_status(resp.status.code, resp.status.message)
        try:
            return response_type.FromString(resp.payload)
        except DecodeError as exc:
            raise Internal(f"ttrpc {service}/{method}: cannot decode response: {exc}") from exc

    async def close(self) -> None:
        """Close the connection; pending calls fail with ``Unavailable``. Idempotent."""
        self._shutdown("client closed")
        if self._read_task is not None:
            if not self._read_task.done():
                self._read_task.cancel()
            await asyncio.wait({self._read_task})
        if self._writer is not None:
            await close_writer(self._writer)
        elif self._protocol is not None:
            await self._protocol.wait_lost(self._transport)

    # -- internals ---------------------------------------------------------------------------------

    def _must_drain(self) -> bool:
        if self._protocol is not None:
            return self._protocol.paused
        # A StreamWriter can only be paused with bytes still buffered.
        return self._transport.get_write_buffer_size() > 0

    async def _drain(self, what: str) -> None:
        try:
            if self._protocol is not None:
                await self._protocol.drain()
            elif self._writer is not None:
                await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._shutdown(f"write failed: {exc}")
            raise Unavailable(f"ttrpc {what}: {self._close_reason}") from exc
        if self._is_closed:
            raise Unavailable(f"ttrpc {what}: {self._close_reason}")

    def _shutdown(self, reason: str) -> None:
        """Mark the connection dead (first reason wins), close it and fail every pending call."""
        if not self._is_closed:
            self._close_reason = reason
            self._is_closed = True
            self._closed.set()
            self._transport.close()
        pending, self._pending = self._pending, {}
        for sid, fut in pending.items():
            if not fut.done():
                fut.set_exception(Unavailable(f"ttrpc: {self._close_reason}", stream_id=sid))

    def _feed(self, data: bytes) -> bool:
        """Handle incoming bytes; ``False`` (after ``_shutdown``) if the connection is broken."""
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            for frame in exc.frames:
                self._deliver(frame)
            reason = f"broken connection: {exc}"
            log.warning("ttrpc client connection closed", reason=reason)
            self._shutdown(reason)
            return False
        for frame in frames:
            if not self._deliver(frame):
                reason = "broken connection: undecodable response"
                log.warning("ttrpc client connection closed", reason=reason, stream_id=frame.stream_id)
                self._shutdown(reason)
                return False
        return True

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "connection closed by peer"
        try:
            while True:
                try:
                    data = await self._reader.read(READ_CHUNK)
                except OSError as exc:
                    reason = f"read failed: {exc}"
                    return
                if not data or not self._feed(data):
                    return
        finally:
            self._shutdown(reason)

    def _deliver(self, frame: Frame) -> bool:
        if frame.type != _RESPONSE:
            return True  # unknown/streaming frame types: ignored
        try:
            resp = request_pb2.Response.FromString(frame.data)
        except DecodeError:
            return False
        fut = self._pending.pop(frame.stream_id, None)
        if fut is None or fut.done():
            log.debug("ttrpc response for no pending call dropped", stream_id=frame.stream_id)
            return True
        fut.set_result(resp)
        return True


def _expire(fut: asyncio.Future[request_pb2.Response]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _ClientProtocol(asyncio.Protocol):
    """Connects a unix-socket transport to its ``Client``: bytes in, connection loss, flow control."""

    def __init__(self) -> None:
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client._feed(data)

    def eof_received(self) -> bool:
        if self.client is not None:
            self.client._shutdown("connection closed by peer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client._shutdown(f"read failed: {exc}" if exc is not None else "connection closed by peer")
        self.paused = False
        self._wake()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self.paused and not self._lost.done():
            w = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(w)
            await w

    async def wait_lost(self, transport: asyncio.BaseTransport) -> None:
        """After ``transport.close()``: let buffered bytes flush for at most ``CLOSE_GRACE``
        seconds, then abort. Never raises (except ``CancelledError``)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), _wire.CLOSE_GRACE)
        except TimeoutError:
            transport.abort()  # type: ignore[attr-defined]
            await self._lost


__all__ = ["Client"]
