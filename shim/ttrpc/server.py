"""ttrpc server: unary calls over a unix socket or any asyncio stream (virtio-serial in the guest).

Each Request runs in its own task, so a call that blocks for hours (``Wait``) never holds up the
others; responses go out in completion order, one whole frame at a time (writes are serialized per
connection). Protocol errors are confined to the connection that made them.

Error mapping (the one place it happens, after the interceptor):

- unknown service / method -> UNIMPLEMENTED ``"service X"`` / ``"method Y"`` (what Go ttrpc says);
- a ``ShimError`` -> its code via ``shim.errors.to_status``; ``TimeoutError`` -> DEADLINE_EXCEEDED;
- the request's ``timeout_nano`` expiring -> the handler is cancelled, DEADLINE_EXCEEDED;
- an undecodable payload -> INVALID_ARGUMENT; any other exception -> INTERNAL (traceback logged once);
- a Request on an even stream id -> INVALID_ARGUMENT (the connection stays up);
- an oversized frame -> RESOURCE_EXHAUSTED on that stream, then the connection is closed;
- an undecodable Request envelope -> the connection is closed;
- frames of other types (Data, unknown) are ignored: this server is unary only.

When the peer closes (EOF), its in-flight handlers are cancelled, as in Go ttrpc: nobody is left
to read their answers. ``asyncio.CancelledError`` is never swallowed: cancelled handlers send nothing.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from shim._pb.ttrpc import request_pb2
from shim.errors import AlreadyExists, Code, ShimError, to_status
from shim.log import get_logger
from shim.ttrpc._wire import READ_CHUNK, close_writer, error_response, metadata_from_wire, ok_response
from shim.ttrpc.codec import (
    MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode_frame,
)

log = get_logger(__name__)

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about its call. ``timeout`` is in seconds (``None``: no deadline)."""

    service: str
    method: str
    metadata: dict[str, list[str]]
    timeout: float | None


@dataclass(frozen=True)
class Method:
    """One RPC: how to decode its request, what it returns, and the coroutine that serves it."""

    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[Any, CallContext], Awaitable[Any]]


Interceptor = Callable[[CallContext, Message, Callable[[], Awaitable[Message]]], Awaitable[Message]]
"""``interceptor(ctx, request, call_next)``: wraps every handler call; ``call_next()`` runs the handler.

It sees the exceptions the handler raises and may raise its own; the server maps whatever escapes.
"""


class Server:
    """Serves registered services; one instance may serve many listeners and streams at once."""

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        interceptor: Interceptor | None = None,
        require_same_uid: bool = True,
    ) -> None:
        """``require_same_uid``: on ``serve_unix`` connections, check SO_PEERCRED and drop peers
        whose uid is neither ours nor root (containerd's ttrpc does the same check).
        """
        self.max_message_size = max_message_size
        self._interceptor = interceptor
        self._require_same_uid = require_same_uid
        self._services: dict[str, dict[str, Method]] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._closed = False

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Serve ``methods`` (bare RPC names) under the full proto ``service`` name.

        Raises ``shim.errors.AlreadyExists`` if ``service`` is registered already.
        """
        if service in self._services:
            raise AlreadyExists(f"ttrpc service {service} is already registered", service=service)
        self._services[service] = dict(methods)

    async def serve_unix(
        self, path: str | os.PathLike[str] | None = None, *, sock: socket.socket | None = None
    ) -> None:
        """Listen on the unix socket ``path`` (or take ``sock``, already bound and listening, e.g.
        fd 3 handed over by the shim's ``start``); return once listening. Connections are served in
        background tasks until ``close()``. Raises ``OSError`` if the socket cannot be set up and
        ``ValueError`` unless exactly one of ``path`` and ``sock`` is given.
        """
        if (path is None) == (sock is None):
            raise ValueError("serve_unix needs exactly one of path and sock")
        if self._closed:
            raise RuntimeError("server is closed")
        if path is not None:
            listener = await asyncio.start_unix_server(self._on_unix_connection, path=os.fspath(path))
        else:
            listener = await asyncio.start_unix_server(self._on_unix_connection, sock=sock)
        self._listeners.append(listener)

    async def serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until the peer closes it, it breaks, or ``close()`` is called.

        Returns normally in all those cases (and closes ``writer``); raises ``CancelledError`` only
        if the calling task itself is cancelled, after cancelling the connection's handlers.
        """
        await self._run_connection(reader, writer)

    async def close(self) -> None:
        """Stop accepting, cancel in-flight handlers (they answer nothing), close every connection.

        Idempotent. Returns once every connection's tasks have finished.
        """
        self._closed = True
        for listener in self._listeners:
            listener.close()
        conns = list(self._connections)
        for conn in conns:
            conn.abort()
        for conn in conns:
            await conn.done.wait()
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()

    # -- internals ---------------------------------------------------------------------------------

    async def _on_unix_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._require_same_uid:
            refused = _peer_refusal(writer)
            if refused is not None:
                log.warning("ttrpc connection refused", reason=refused)
                writer.close()
                return
        await self._run_connection(reader, writer)

    async def _run_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    def _lookup(self, service: str, method: str) -> Method | tuple[Code, str]:
        methods = self._services.get(service)
        if methods is None:
            return Code.UNIMPLEMENTED, f"service {service}"
        m = methods.get(method)
        if m is None:
            return Code.UNIMPLEMENTED, f"method {method}"
        return m


def _peer_refusal(writer: asyncio.StreamWriter) -> str | None:
    """Why the peer may not talk to us, or ``None``. Root and our own uid are allowed."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as exc:
        return f"cannot read peer credentials: {exc}"
    if uid in (0, os.geteuid()):
        return None
    return f"peer uid {uid} is not {os.geteuid()}"


class _Connection:
    """One connection's read loop and handler tasks. The read loop owns the decoder; ``_send`` owns
    the writer (under ``_write_lock``); ``_handlers`` maps a stream id to the task answering it.
    """

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(server.max_message_size)
        self._write_lock = asyncio.Lock()
        self._handlers: dict[int, asyncio.Task[None]] = {}
        self._read_task: asyncio.Task[None] | None = None
        self._aborted = False
        self.done = asyncio.Event()
        peer = writer.get_extra_info("peername")
        self._log = log.bind(peer=peer or None)

    def abort(self) -> None:
        """Make ``run`` wind down: stop reading, cancel handlers."""
        self._aborted = True
        if self._read_task is not None:
            self._read_task.cancel()

    async def run(self) -> None:
        try:
            if self._aborted:
                return
            self._read_task = asyncio.create_task(self._read_loop(), name="ttrpc-server-read")
            # asyncio.wait: a cancelled read task must not look like *our* cancellation.
            await asyncio.wait({self._read_task})
            if not self._read_task.cancelled() and self._read_task.exception() is not None:
                exc = self._read_task.exception()
                self._log.error("ttrpc connection read loop failed", exc_info=exc)
        finally:
            if self._read_task is not None and not self._read_task.done():
                self._read_task.cancel()
            await self._teardown()

    async def _teardown(self) -> None:
        tasks = [t for t in (self._read_task, *self._handlers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        try:
            await close_writer(self._writer)
        finally:
            self.done.set()

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._reader.read(READ_CHUNK)
            except OSError as exc:
                self._log.debug("ttrpc connection read failed", error=str(exc))
                return
            if not data:
                if self._decoder.buffered:
                    self._log.warning(
                        "ttrpc connection closed",
                        reason="EOF inside a frame",
                        buffered=self._decoder.buffered,
                    )
                return
            try:
                frames = self._decoder.feed(data)
            except ProtocolError as exc:
                for frame in exc.frames:
                    if not await self._dispatch(frame):
                        return
                await self._send_status(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                self._log.warning("ttrpc connection closed", reason=str(exc), stream_id=exc.stream_id)
                return
            for frame in frames:
                if not await self._dispatch(frame):
                    return

    async def _dispatch(self, frame: Frame) -> bool:
        """Handle one frame; ``False`` means the connection must be closed."""
        if frame.type != FrameType.REQUEST:
            return True  # Data frames and unknown types: ignored (unary server, forward compat)
        try:
            req = request_pb2.Request.FromString(frame.data)
        except DecodeError as exc:
            self._log.warning(
                "ttrpc connection closed", reason=f"undecodable request: {exc}", stream_id=frame.stream_id
            )
            return False
        sid = frame.stream_id
        if sid % 2 != 1:
            await self._send_status(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
            return True
        if sid in self._handlers:
            self._log.warning(
                "ttrpc connection closed", reason="stream id reused while active", stream_id=sid
            )
            return False
        found = self._server._lookup(req.service, req.method)
        if isinstance(found, tuple):
            await self._send_status(sid, *found)
            return True
        ctx = CallContext(
            service=req.service,
            method=req.method,
            metadata=metadata_from_wire(req.metadata),
            timeout=req.timeout_nano / 1e9 if req.timeout_nano > 0 else None,
        )
        task = asyncio.create_task(
            self._handle(sid, found, ctx, req.payload), name=f"ttrpc {req.service}/{req.method} #{sid}"
        )
        self._handlers[sid] = task
        task.add_done_callback(functools.partial(self._forget, sid))
        return True

    def _forget(self, sid: int, _task: asyncio.Task[None]) -> None:
        self._handlers.pop(sid, None)

    async def _handle(self, sid: int, method: Method, ctx: CallContext, payload: bytes) -> None:
        try:
            request = method.request_type.FromString(payload)
        except DecodeError as exc:
            await self._send_status(sid, Code.INVALID_ARGUMENT, f"cannot decode {ctx.method} request: {exc}")
            return

        async def call_next() -> Message:
            return await method.handler(request, ctx)

        interceptor = self._server._interceptor
        try:
            async with asyncio.timeout(ctx.timeout) as deadline:
                if interceptor is not None:
                    response = await interceptor(ctx, request, call_next)
                else:
                    response = await call_next()
            data = response.SerializeToString()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                # Cancelled from inside the handler, not by us: the caller still deserves an answer.
                await self._send_status(sid, Code.CANCELLED, "handler was cancelled")
            raise
        except TimeoutError as exc:
            msg = "context deadline exceeded" if deadline.expired() else (str(exc) or "timed out")
            await self._send_status(sid, Code.DEADLINE_EXCEEDED, msg)
            return
        except ShimError as exc:
            await self._send_status(sid, *to_status(exc))
            return
        except Exception as exc:
            self._log.exception("ttrpc handler failed", service=ctx.service, method=ctx.method)
            await self._send_status(sid, *to_status(exc))
            return
        await self._send(sid, ok_response(data))

    async def _send_status(self, sid: int, code: int, message: str) -> None:
        await self._send(sid, error_response(code, message))

    async def _send(self, sid: int, body: bytes) -> None:
        """Write one Response frame; a response too big for the peer becomes RESOURCE_EXHAUSTED.

        Write errors are dropped: the connection is going away and the read loop will notice.
        """
        max_size = self._server.max_message_size
        try:
            data = encode_frame(Frame(sid, FrameType.RESPONSE, 0, body), max_size)
        except ShimError as exc:
            body = error_response(Code.RESOURCE_EXHAUSTED, f"response too large: {exc}")
            data = encode_frame(Frame(sid, FrameType.RESPONSE, 0, body), max_size)
        async with self._write_lock:
            if self._writer.is_closing():
                return
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._log.debug("ttrpc response not delivered", stream_id=sid, error=str(exc))


__all__ = ["CallContext", "Interceptor", "Method", "Server"]
