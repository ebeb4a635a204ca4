"""ttrpc server: unary calls over a unix socket or any asyncio stream (virtio-serial in the guest).

Each Request runs concurrently with the others, so a call that blocks for hours (``Wait``) never
holds up the rest; responses go out in completion order, one whole frame per transport write (so
frames never interleave). Protocol errors are confined to the connection that made them.

Unix-socket connections are served by an ``asyncio.Protocol`` (bytes go straight from
``data_received`` through the decoder to dispatch, and responses straight to ``transport.write``);
``serve_stream`` drives the same connection core from a ``StreamReader``. A handler normally runs in
its own task. On unix-socket connections a ``Method`` marked ``eager`` instead starts synchronously inside dispatch: if it
finishes without suspending (``State``) it is answered with no task and no timer at all; if it
suspends, the rest of it continues in a task, under its deadline, exactly as a normal call would.

Error mapping (the one place it happens, after the interceptor):

- unknown service / method -> UNIMPLEMENTED ``"service X"`` / ``"method Y"`` (what Go ttrpc says);
- a ``ShimError`` -> its code via ``shim.errors.to_status``; ``TimeoutError`` -> DEADLINE_EXCEEDED;
- the request's ``timeout_nano`` expiring -> the handler is cancelled, DEADLINE_EXCEEDED;
- an undecodable payload -> INVALID_ARGUMENT; any other exception -> INTERNAL (traceback logged once);
- a Request on an even stream id -> INVALID_ARGUMENT (the connection stays up);
- an oversized frame -> RESOURCE_EXHAUSTED on that stream, then the connection is closed;
- an undecodable Request envelope -> the connection is closed;
- frames of other types (Data, unknown) are ignored: this server is unary only.

Requests decoded before a fatal frame are still dispatched; those that finish at once are answered
before the connection closes. When the peer closes (EOF), its in-flight handlers are cancelled, as
in Go ttrpc: nobody is left to read their answers. ``asyncio.CancelledError`` is never swallowed:
cancelled handlers send nothing. (A handler that raises ``CancelledError`` on its own, without its
task being cancelled, is answered CANCELLED.)

Flow control: while the peer does not read (the transport's write buffer is over its high-water
mark) a unix connection stops reading requests, and handlers that finish wait for the buffer to
drain before they complete; ``serve_stream`` drains before every read.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import functools
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from shim._pb.ttrpc import request_pb2
from shim.errors import AlreadyExists, Code, ShimError, to_status
from shim.log import get_logger
from shim.ttrpc import _wire
from shim.ttrpc._wire import (
    READ_CHUNK,
    close_writer,
    error_response,
    frame_bytes,
    metadata_from_wire,
    ok_response,
)
from shim.ttrpc.codec import MAX_MESSAGE_SIZE, FrameDecoder, FrameType, ProtocolError

log = get_logger(__name__)

_UCRED = struct.Struct("3i")
_REQUEST = FrameType.REQUEST.value
_RESPONSE = FrameType.RESPONSE.value


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call. ``timeout`` is in seconds (``None``: no deadline)."""

    service: str
    method: str
    metadata: dict[str, list[str]]
    timeout: float | None


@dataclass(frozen=True)
class Method:
    """One RPC: how to decode its request, what it returns, and the coroutine that serves it.

    ``eager``: start the handler (and the interceptor around it) synchronously when its request is
    dispatched, instead of in a new task. Until its first suspension it then runs outside any task,
    so it must not need ``asyncio.current_task()`` before its first ``await`` that suspends (no
    ``asyncio.timeout``/``TaskGroup`` there). Worth it for cheap, mostly synchronous polling calls.
    """

    request_type: type[Message]
    response_type: type[Message]
    handler: Callable[[Any, CallContext], Awaitable[Any]]
    eager: bool = False


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
        fd 3 handed over by the shim's ``start``); return once listening. Connections are served
        until ``close()``. Raises ``OSError`` if the socket cannot be set up and ``ValueError``
        unless exactly one of ``path`` and ``sock`` is given.
        """
        if (path is None) == (sock is None):
            raise ValueError("serve_unix needs exactly one of path and sock")
        if self._closed:
            raise RuntimeError("server is closed")
        loop = asyncio.get_running_loop()
        factory = functools.partial(_ServerProtocol, self)
        if path is not None:
            listener = await loop.create_unix_server(factory, path=os.fspath(path))
        else:
            listener = await loop.create_unix_server(factory, sock=sock)
        self._listeners.append(listener)

    async def serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection until the peer closes it, it breaks, or ``close()`` is called.

        Returns normally in all those cases (and closes ``writer``); raises ``CancelledError`` only
        if the calling task itself is cancelled, after cancelling the connection's handlers.
        """
        if self._closed:
            writer.close()
            return
        conn = _StreamConnection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

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

    def _lookup(self, service: str, method: str) -> Method | tuple[Code, str]:
        methods = self._services.get(service)
        if methods is None:
            return Code.UNIMPLEMENTED, f"service {service}"
        m = methods.get(method)
        if m is None:
            return Code.UNIMPLEMENTED, f"method {method}"
        return m


def _peer_refusal(transport: Any) -> str | None:
    """Why the peer of ``transport`` (anything with ``get_extra_info``) may not talk to us, or
    ``None``. Root and our own uid are allowed."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as exc:
        return f"cannot read peer credentials: {exc}"
    if uid in (0, os.geteuid()):
        return None
    return f"peer uid {uid} is not {os.geteuid()}"


class _Call:
    """One in-flight request: its stream id, context, deadline and (once it needs one) its task."""

    __slots__ = ("ctx", "deadline", "expired", "sid", "task", "timer")

    def __init__(self, sid: int, ctx: CallContext, deadline: float | None) -> None:
        self.sid = sid
        self.ctx = ctx
        self.deadline = deadline
        self.expired = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        """Timer callback: the request's deadline passed; cancel its task (see ``_serve_call``)."""
        self.timer = None
        if self.task is not None and not self.task.done():
            self.expired = True
            self.task.cancel()


class _Continue(collections.abc.Coroutine):  # type: ignore[type-arg]
    """Hands a coroutine that already ran its first step (eagerly, outside any task) to a Task.

    The Task's first ``send(None)`` gets back what the coroutine yielded then (the future it waits
    on); everything after — sends, and cancellation thrown in, even before the Task's first step —
    goes to the coroutine itself, as if the Task had run it from the start.
    """

    __slots__ = ("_coro", "_first")

    _NOTHING: Any = object()

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not self._NOTHING:
            self._first = self._NOTHING
            return first
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        first = self._first
        if first is not self._NOTHING:
            # Thrown in before the Task ever saw the future: do what the Task would have done on
            # receiving it (clear the "blocking" mark, or the next await of it raises
            # RuntimeError) and on being cancelled while waiting on it (cancel it).
            self._first = self._NOTHING
            if isinstance(first, asyncio.Future):
                first._asyncio_future_blocking = False
                if isinstance(args[0], asyncio.CancelledError) or args[0] is asyncio.CancelledError:
                    first.cancel()
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)


class _Connection:
    """The transport-independent part of one connection: decoding, dispatch, handler bookkeeping.

    The transport side (a ``_ServerProtocol`` or ``_StreamConnection``) feeds bytes to ``feed``,
    provides ``_write``/``_writable``/``_drain`` and ends the connection. ``_handlers`` maps a
    stream id to the task answering it (calls that finished eagerly never get one).
    """

    _eager_ok = True
    """Whether ``Method.eager`` is honoured: only where dispatch runs outside any task."""

    def __init__(self, server: Server, peer: Any) -> None:
        self._server = server
        self._services = server._services
        self._interceptor = server._interceptor
        self._max_size = server.max_message_size
        self._decoder = FrameDecoder(server.max_message_size)
        self._handlers: dict[int, asyncio.Task[None]] = {}
        self._loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        self._log = log.bind(peer=peer or None)

    # -- transport side ---------------------------------------------------------------------------

    def abort(self) -> None:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        """Queue ``data`` on the transport (never blocks); dropped if the transport is closing."""
        raise NotImplementedError

    def _must_drain(self) -> bool:
        raise NotImplementedError

    async def _drain(self) -> None:
        raise NotImplementedError

    # -- decoding and dispatch ----------------------------------------------------------------------

    def feed(self, data: bytes) -> bool:
        """Handle what the transport delivered; ``False`` means the connection must be closed."""
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            for frame in exc.frames:
                if not self._dispatch(frame.stream_id, frame.type, frame.data):
                    return False
            self._send_status(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
            self._log.warning("ttrpc connection closed", reason=str(exc), stream_id=exc.stream_id)
            return False
        for frame in frames:
            if not self._dispatch(frame.stream_id, frame.type, frame.data):
                return False
        return True

    def _dispatch(self, sid: int, ftype: int, data: bytes) -> bool:
        """Handle one frame; ``False`` means the connection must be closed."""
        if ftype != _REQUEST:
            return True  # Data frames and unknown types: ignored (unary server, forward compat)
        try:
            req = request_pb2.Request.FromString(data)
        except DecodeError as exc:
            self._log.warning("ttrpc connection closed", reason=f"undecodable request: {exc}", stream_id=sid)
            return False
        if not sid & 1:
            self._send_status(sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            return True
        if sid in self._handlers:
            self._log.warning(
                "ttrpc connection closed", reason="stream id reused while active", stream_id=sid
            )
            return False
        service = req.service
        name = req.method
        methods = self._services.get(service)
        method = methods.get(name) if methods is not None else None
        if method is None:
            self._send_status(sid, *self._server._lookup(service, name))  # type: ignore[misc]
            return True
        try:
            request = method.request_type.FromString(req.payload)
        except DecodeError as exc:
            self._send_status(sid, Code.INVALID_ARGUMENT, f"cannot decode {name} request: {exc}")
            return True
        timeout_nano = req.timeout_nano
        timeout = timeout_nano / 1e9 if timeout_nano > 0 else None
        ctx = CallContext(service, name, metadata_from_wire(req.metadata) if req.metadata else {}, timeout)
        call = _Call(sid, ctx, self._loop.time() + timeout if timeout is not None else None)
        coro = self._serve_call(call, method, request)
        if method.eager and self._eager_ok:
            self._start_eagerly(call, coro)
        else:
            self._start_task(call, coro, None)
        return True

    def _start_eagerly(self, call: _Call, coro: Coroutine[Any, Any, None]) -> None:
        # A context of its own, as a task would have: the handler may bind contextvars.
        context = contextvars.copy_context()
        try:
            yielded = context.run(coro.send, None)
        except StopIteration:
            return  # answered already
        except asyncio.CancelledError:
            # The handler raised it on its own (no task of ours was cancelled): it has been
            # answered CANCELLED by _serve_call; there is no task to propagate it to.
            return
        self._start_task(call, _Continue(coro, yielded), context)

    def _start_task(
        self, call: _Call, coro: Coroutine[Any, Any, None], context: contextvars.Context | None
    ) -> None:
        ctx = call.ctx
        task = self._loop.create_task(
            coro, name=f"ttrpc {ctx.service}/{ctx.method} #{call.sid}", context=context
        )
        call.task = task
        if call.deadline is not None:
            call.timer = self._loop.call_at(call.deadline, call.expire)
        self._handlers[call.sid] = task
        task.add_done_callback(functools.partial(self._forget, call.sid))

    def _forget(self, sid: int, _task: asyncio.Task[None]) -> None:
        self._handlers.pop(sid, None)

    async def _serve_call(self, call: _Call, method: Method, request: Message) -> None:
        """Run the handler (through the interceptor) and answer ``call``.

        Runs in ``call.task``, or — for an eager method — first outside any task, then in the task
        ``_start_eagerly`` made when it suspended. ``call.task`` is ``None`` while outside a task,
        and the deadline is only armed (``call.timer``) once there is a task to cancel: a handler
        that never suspends cannot be interrupted anyway.
        """
        ctx = call.ctx
        try:
            try:
                if self._interceptor is not None:
                    response = await self._interceptor(
                        ctx, request, functools.partial(method.handler, request, ctx)
                    )
                else:
                    response = await method.handler(request, ctx)
                body = ok_response(response.SerializeToString())
            except asyncio.CancelledError:
                task = call.task
                if call.expired and task is not None and task.uncancel() == 0:
                    body = error_response(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
                elif task is None or not task.cancelling():
                    # Cancelled from inside the handler, not by us: the caller still deserves an answer.
                    self._send_status(call.sid, Code.CANCELLED, "handler was cancelled")
                    raise
                else:
                    raise
            except TimeoutError as exc:
                body = error_response(Code.DEADLINE_EXCEEDED, str(exc) or "timed out")
            except ShimError as exc:
                body = error_response(*to_status(exc))
            except Exception as exc:
                self._log.exception("ttrpc handler failed", service=ctx.service, method=ctx.method)
                body = error_response(*to_status(exc))
        finally:
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
        self._respond(call.sid, body)
        if call.task is not None and self._must_drain():
            await self._drain()

    def _send_status(self, sid: int, code: int, message: str) -> None:
        self._respond(sid, error_response(code, message))

    def _respond(self, sid: int, body: bytes) -> None:
        """Write one Response frame; a response too big for the peer becomes RESOURCE_EXHAUSTED."""
        if len(body) > self._max_size:
            body = error_response(
                Code.RESOURCE_EXHAUSTED,
                f"response too large: message length {len(body)} exceeds maximum message size "
                f"of {self._max_size}",
            )
        self._write(frame_bytes(sid, _RESPONSE, body))

    def _cancel_handlers(self) -> list[asyncio.Task[None]]:
        tasks = list(self._handlers.values())
        for t in tasks:
            t.cancel()
        return tasks


class _ServerProtocol(asyncio.Protocol, _Connection):
    """A unix-socket connection: the event loop calls us with bytes; we write to the transport.

    ``_paused`` mirrors the transport's write flow control; while it is set we also stop reading,
    so a peer that does not read its answers cannot make us queue unbounded responses.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] | None = None
        self._closing = False
        self._ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        if server._require_same_uid:
            refused = _peer_refusal(transport)
            if refused is not None:
                log.warning("ttrpc connection refused", reason=refused)
                self._ended = True
                transport.close()
                return
        if server._closed:
            self._ended = True
            transport.close()
            return
        _Connection.__init__(self, server, transport.get_extra_info("peername"))
        self._lost = self._loop.create_future()
        server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._ended:
            return
        if not self.feed(data):
            self._close()

    def eof_received(self) -> bool:
        if not self._closing and self._decoder.buffered:
            self._log.warning(
                "ttrpc connection closed", reason="EOF inside a frame", buffered=self._decoder.buffered
            )
        self._close()
        return True  # keep the transport; _shutdown closes it once handlers are done

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ended:
            return
        if exc is not None and not self._closing:
            self._log.debug("ttrpc connection read failed", error=str(exc))
        self._wake_drainers()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._close()

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def abort(self) -> None:
        self._close()

    def _write(self, data: bytes) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(data)

    def _must_drain(self) -> bool:
        return self._paused

    async def _drain(self) -> None:
        if self._paused and self._lost is not None and not self._lost.done():
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    def _close(self) -> None:
        """Stop reading; in a task (so that handler tasks queued by this very callback run their
        first step first), cancel the handlers, then close the transport."""
        if self._closing or self._ended:
            return
        self._closing = True
        self._loop.create_task(self._shutdown(), name="ttrpc-server-close")

    async def _shutdown(self) -> None:
        transport = self._transport
        assert transport is not None and self._lost is not None
        try:
            tasks = self._cancel_handlers()
            if tasks:
                await asyncio.wait(tasks)
            transport.close()  # flushes what is buffered, then connection_lost
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), _wire.CLOSE_GRACE)
            except TimeoutError:
                transport.abort()
                await self._lost
        finally:
            self._ended = True
            self._server._connections.discard(self)
            self.done.set()


class _StreamConnection(_Connection):
    """A connection over a ``StreamReader``/``StreamWriter`` pair (the guest agent's virtio-serial
    port, socketpairs): a read task feeds the core; writes go to the ``StreamWriter``.

    Dispatch runs inside the read task here, so eager Methods get a task like any other (an eager
    handler would otherwise see the read task as its ``current_task()``).
    """

    _eager_ok = False

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(server, writer.get_extra_info("peername"))
        self._reader = reader
        self._writer = writer
        self._read_task: asyncio.Task[None] | None = None
        self._aborted = False

    def abort(self) -> None:
        """Make ``run`` wind down: stop reading, cancel handlers."""
        self._aborted = True
        if self._read_task is not None:
            self._read_task.cancel()

    def _write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def _must_drain(self) -> bool:
        return True

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._log.debug("ttrpc response not delivered", error=str(exc))

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
        tasks = self._cancel_handlers()
        if self._read_task is not None:
            self._read_task.cancel()
            tasks.append(self._read_task)
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
            if not self.feed(data):
                return
            # Answers written by eager calls: let them drain before reading more requests.
            await self._drain()


__all__ = ["CallContext", "Interceptor", "Method", "Server"]
