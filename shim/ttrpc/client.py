"""ttrpc client: concurrent unary calls multiplexed over one connection.

Stream ids are odd, starting at 1, +2 per call (as the Go client). One read task matches responses
to pending calls; writes are serialized. When the connection breaks — EOF, a read error, an
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
from shim.ttrpc._wire import READ_CHUNK, close_writer, metadata_to_wire
from shim.ttrpc.codec import (
    MAX_MESSAGE_SIZE,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode_frame,
)

log = get_logger(__name__)

M = TypeVar("M", bound=Message)


class Client:
    """A ttrpc connection. Use from one event loop; ``call`` may run concurrently from many tasks.

    State: ``_pending`` (stream id -> future of the Response) is owned by the event loop; the read
    task resolves entries, ``call`` adds and removes its own. ``_write_lock`` serializes frames.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        """Prefer ``connect_unix`` / ``from_stream``. Needs a running event loop."""
        self.max_message_size = max_message_size
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(max_message_size)
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[request_pb2.Response]] = {}
        self._next_id = 1
        self._closed = asyncio.Event()
        self._close_reason = "connection closed"
        self._read_task = asyncio.create_task(self._read_loop(), name="ttrpc-client-read")

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
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(p, limit=READ_CHUNK)
        except TimeoutError as exc:
            raise Unavailable(f"ttrpc connect to {p}: timed out after {timeout}s", path=p) from exc
        except OSError as exc:
            raise Unavailable(f"ttrpc connect to {p}: {exc}", path=p) from exc
        return cls(reader, writer, max_message_size=max_message_size)

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
        return self._closed.is_set()

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
        if self.closed:
            raise Unavailable(f"ttrpc {service}/{method}: {self._close_reason}")
        req = request_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9) if timeout is not None and timeout > 0 else 0,
            metadata=metadata_to_wire(metadata),
        )
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise ResourceExhausted("ttrpc stream ids exhausted on this connection; reconnect")
        data = encode_frame(Frame(sid, FrameType.REQUEST, 0, req.SerializeToString()), self.max_message_size)
        self._next_id += 2
        fut: asyncio.Future[request_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        try:
            async with asyncio.timeout(timeout):
                await self._write(data, f"{service}/{method}")
                resp = await fut
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"ttrpc {service}/{method}: no response within {timeout}s", service=service, method=method
            ) from exc
        finally:
            self._pending.pop(sid, None)
        if resp.HasField("status") and resp.status.code != 0:
            raise from_status(resp.status.code, resp.status.message)
        try:
            return response_type.FromString(resp.payload)
        except DecodeError as exc:
            raise Internal(f"ttrpc {service}/{method}: cannot decode response: {exc}") from exc

    async def close(self) -> None:
        """Close the connection; pending calls fail with ``Unavailable``. Idempotent."""
        self._shutdown("client closed")
        if not self._read_task.done():
            self._read_task.cancel()
        await asyncio.wait({self._read_task})
        await close_writer(self._writer)

    # -- internals ---------------------------------------------------------------------------------

    async def _write(self, data: bytes, what: str) -> None:
        async with self._write_lock:
            if self.closed:
                raise Unavailable(f"ttrpc {what}: {self._close_reason}")
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._shutdown(f"write failed: {exc}")
                raise Unavailable(f"ttrpc {what}: {self._close_reason}") from exc

    def _shutdown(self, reason: str) -> None:
        """Mark the connection dead (first reason wins), close it and fail every pending call."""
        if not self._closed.is_set():
            self._close_reason = reason
            self._closed.set()
            self._writer.close()
        pending, self._pending = self._pending, {}
        for sid, fut in pending.items():
            if not fut.done():
                fut.set_exception(Unavailable(f"ttrpc: {self._close_reason}", stream_id=sid))

    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                try:
                    data = await self._reader.read(READ_CHUNK)
                except OSError as exc:
                    reason = f"read failed: {exc}"
                    return
                if not data:
                    return
                try:
                    frames = self._decoder.feed(data)
                except ProtocolError as exc:
                    for frame in exc.frames:
                        self._deliver(frame)
                    reason = f"broken connection: {exc}"
                    log.warning("ttrpc client connection closed", reason=reason)
                    return
                for frame in frames:
                    if not self._deliver(frame):
                        reason = "broken connection: undecodable response"
                        log.warning(
                            "ttrpc client connection closed", reason=reason, stream_id=frame.stream_id
                        )
                        return
        finally:
            self._shutdown(reason)

    def _deliver(self, frame: Frame) -> bool:
        if frame.type != FrameType.RESPONSE:
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


__all__ = ["Client"]
