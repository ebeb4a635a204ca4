"""ttrpc server + client over a unix socket and over a socketpair stream."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest
import structlog.testing
from conftest import SERVICE, Recorder, make_methods

from shim import errors
from shim._pb.ttrpc.request_pb2 import KeyValue, Request, Response, StringList
from shim.errors import Code
from shim.ttrpc import CallContext, Client, Frame, FrameDecoder, FrameType, Server, encode_frame
from shim.ttrpc import _wire as wire_mod
from shim.ttrpc import server as server_mod
from shim.ttrpc.codec import MAX_MESSAGE_SIZE


class RawConn:
    """Speaks frames by hand, to send what a well-behaved client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    @classmethod
    async def open(cls, path: Path) -> RawConn:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def request(self, sid: int, service: str, method: str, payload: bytes = b"", **kw: object) -> None:
        req = Request(service=service, method=method, payload=payload, **kw)
        await self.send(encode_frame(Frame(sid, FrameType.REQUEST, 0, req.SerializeToString())))

    async def recv(self, wait: float = 10) -> Frame | None:
        """The next frame, or None on EOF."""
        async with asyncio.timeout(wait):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def recv_response(self) -> tuple[int, Response]:
        frame = await self.recv()
        assert frame is not None, "connection closed"
        assert (frame.type, frame.flags) == (FrameType.RESPONSE, 0)
        return frame.stream_id, Response.FromString(frame.data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@pytest.fixture
async def raw(sock_path: Path):
    conn = await RawConn.open(sock_path)
    try:
        yield conn
    finally:
        await conn.close()


async def echo(client: Client, value: str = "v", **kw) -> KeyValue:
    return await client.call(SERVICE, "Echo", KeyValue(key="k", value=value), KeyValue, **kw)


# -- basic calls -----------------------------------------------------------------------------------


async def test_unary_round_trip(client: Client) -> None:
    assert await echo(client, "hello") == KeyValue(key="k", value="hello")


async def test_empty_response_payload(client: Client) -> None:
    assert await client.call(SERVICE, "Echo", KeyValue(), KeyValue) == KeyValue()


async def test_metadata_and_timeout_reach_the_handler(client: Client) -> None:
    resp = await client.call(
        SERVICE, "Meta", KeyValue(), StringList, timeout=30, metadata={"X-Trace": ["a", "b"], "ns": "default"}
    )
    assert resp.list[0].startswith("timeout=")
    assert 29 < float(resp.list[0].split("=")[1]) <= 30
    assert list(resp.list[1:]) == ["ns=default", "x-trace=a", "x-trace=b"]
    resp = await client.call(SERVICE, "Meta", KeyValue(), StringList)
    assert list(resp.list) == ["timeout=None"]


async def test_wire_shape_of_client_requests() -> None:
    """Odd stream ids from 1 step 2, timeout_nano from the timeout, one KeyValue per value."""
    a, b = socket.socketpair()
    cr, cw = await asyncio.open_connection(sock=a)
    peer = RawConn(*await asyncio.open_connection(sock=b))
    client = Client.from_stream(cr, cw)
    try:
        calls = [
            asyncio.create_task(echo(client, str(i), timeout=2.5, metadata={"K": ["1", "2"]}))
            for i in range(3)
        ]
        seen = []
        for _ in range(3):
            frame = await peer.recv()
            assert frame is not None and (frame.type, frame.flags) == (FrameType.REQUEST, 0)
            req = Request.FromString(frame.data)
            seen.append(frame.stream_id)
            assert (req.service, req.method, req.timeout_nano) == (SERVICE, "Echo", 2_500_000_000)
            assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "1"), ("k", "2")]
            # Success responses carry no status field, like the Go server.
            ok = Response(payload=KeyValue(value=f"r{frame.stream_id}").SerializeToString())
            assert ok.SerializeToString()[:1] == b"\x12"
            await peer.send(
                encode_frame(Frame(frame.stream_id, FrameType.RESPONSE, 0, ok.SerializeToString()))
            )
        assert seen == [1, 3, 5]
        results = await asyncio.gather(*calls)
        assert sorted(r.value for r in results) == ["r1", "r3", "r5"]
    finally:
        await client.close()
        await peer.close()


# -- concurrency -----------------------------------------------------------------------------------


async def test_slow_call_does_not_block_fast_one(client: Client, recorder: Recorder) -> None:
    slow = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(key="slow", value="1.5"), KeyValue))
    await recorder.until(lambda: "slow" in recorder.started)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert (await echo(client, "fast")).value == "fast"
    assert loop.time() - t0 < 1.0
    assert not slow.done()
    assert (await slow).value == "slept"


async def test_responses_come_back_out_of_order(client: Client) -> None:
    order: list[str] = []

    async def sleeper(name: str, secs: float) -> None:
        await client.call(SERVICE, "Sleep", KeyValue(key=name, value=str(secs)), KeyValue)
        order.append(name)

    await asyncio.gather(sleeper("a", 0.6), sleeper("b", 0.3), sleeper("c", 0.0))
    assert order == ["c", "b", "a"]


async def test_many_concurrent_calls(client: Client) -> None:
    results = await asyncio.gather(*(echo(client, str(i)) for i in range(200)))
    assert [r.value for r in results] == [str(i) for i in range(200)]


# -- timeouts --------------------------------------------------------------------------------------


async def test_per_call_timeout_and_late_response_is_dropped(client: Client, recorder: Recorder) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        await client.call(SERVICE, "Sleep", KeyValue(key="t", value="0.5"), KeyValue, timeout=0.1)
    # The server was told the deadline too and cancelled the handler ...
    await recorder.until(lambda: "t" in recorder.cancelled)
    assert recorder.cancelled == ["t"]
    # ... and its late DEADLINE_EXCEEDED answer is dropped; the connection is still fine.
    await asyncio.sleep(0.2)
    assert (await echo(client, "after")).value == "after"
    assert client._pending == {}


async def test_client_timeout_without_server_deadline() -> None:
    """A silent peer: the call times out; the answer arriving later goes nowhere."""
    a, b = socket.socketpair()
    client = Client.from_stream(*await asyncio.open_connection(sock=a))
    peer = RawConn(*await asyncio.open_connection(sock=b))
    try:
        with pytest.raises(errors.DeadlineExceeded):
            await echo(client, timeout=0.2)
        frame = await peer.recv()
        assert frame is not None
        late = Response(payload=KeyValue(value="late").SerializeToString()).SerializeToString()
        await peer.send(encode_frame(Frame(frame.stream_id, FrameType.RESPONSE, 0, late)))
        call = asyncio.create_task(echo(client, timeout=5))
        frame2 = await peer.recv()
        assert frame2 is not None and frame2.stream_id == frame.stream_id + 2
        ok = Response(payload=KeyValue(value="fresh").SerializeToString()).SerializeToString()
        await peer.send(encode_frame(Frame(frame2.stream_id, FrameType.RESPONSE, 0, ok)))
        assert (await call).value == "fresh"
    finally:
        await client.close()
        await peer.close()


async def test_server_honours_timeout_nano(raw: RawConn, recorder: Recorder) -> None:
    payload = KeyValue(key="srv", value="30").SerializeToString()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await raw.request(1, SERVICE, "Sleep", payload, timeout_nano=200_000_000)
    sid, resp = await raw.recv_response()
    assert sid == 1
    assert resp.status.code == Code.DEADLINE_EXCEEDED
    assert loop.time() - t0 < 5
    assert recorder.cancelled == ["srv"]


async def test_negative_timeout_nano_means_no_deadline(raw: RawConn) -> None:
    await raw.request(1, SERVICE, "Meta", b"", timeout_nano=-5)
    _, resp = await raw.recv_response()
    assert list(StringList.FromString(resp.payload).list) == ["timeout=None"]


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["NotFound", "AlreadyExists", "InvalidArgument", "FailedPrecondition", "Unavailable", "Unimplemented",
     "DeadlineExceeded", "ResourceExhausted", "PermissionDenied"],
)  # fmt: skip
async def test_error_classes_round_trip(client: Client, name: str) -> None:
    with pytest.raises(errors.ShimError) as ei:
        await client.call(SERVICE, "Fail", KeyValue(key=name, value=f"{name} happened"), KeyValue)
    assert type(ei.value) is getattr(errors, name)
    assert str(ei.value) == f"{name} happened"


async def test_invalid_state_arrives_as_failed_precondition(server: Server, client: Client) -> None:
    with pytest.raises(errors.FailedPrecondition):
        await client.call(SERVICE, "Fail", KeyValue(key="FailedPrecondition", value="x"), KeyValue)


async def test_unexpected_exception_is_internal(client: Client) -> None:
    with pytest.raises(errors.Internal, match="kaboom"):
        await client.call(SERVICE, "Boom", KeyValue(), KeyValue)


async def test_timeout_error_is_deadline_exceeded(client: Client) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        await client.call(SERVICE, "TimeoutError", KeyValue(), KeyValue)


async def test_unknown_service_and_method_are_unimplemented(client: Client) -> None:
    with pytest.raises(errors.Unimplemented) as ei:
        await client.call("containerd.task.v3.Task", "State", KeyValue(), KeyValue)
    assert str(ei.value) == "service containerd.task.v3.Task"
    assert ei.value.facts["remote_code"] == 12
    with pytest.raises(errors.Unimplemented) as ei:
        await client.call(SERVICE, "Nope", KeyValue(), KeyValue)
    assert str(ei.value) == "method Nope"


async def test_garbage_payload_is_invalid_argument(raw: RawConn) -> None:
    await raw.request(1, SERVICE, "Echo", b"\xff\xff\xff")
    sid, resp = await raw.recv_response()
    assert (sid, resp.status.code) == (1, Code.INVALID_ARGUMENT)


async def test_undecodable_response_payload_is_internal() -> None:
    a, b = socket.socketpair()
    client = Client.from_stream(*await asyncio.open_connection(sock=a))
    peer = RawConn(*await asyncio.open_connection(sock=b))
    try:
        call = asyncio.create_task(echo(client))
        frame = await peer.recv()
        bad = Response(payload=b"\xff\xff").SerializeToString()
        await peer.send(encode_frame(Frame(frame.stream_id, FrameType.RESPONSE, 0, bad)))
        with pytest.raises(errors.Internal):
            await call
    finally:
        await client.close()
        await peer.close()


async def test_interceptor_wraps_every_call(recorder: Recorder, short_tmp: Path) -> None:
    seen: list[tuple[str, str]] = []

    async def interceptor(ctx: CallContext, request, call_next):
        seen.append((ctx.method, type(request).__name__))
        if ctx.method == "Boom":
            raise errors.PermissionDenied("intercepted")
        return await call_next()

    srv = Server(interceptor=interceptor)
    srv.register(SERVICE, make_methods(recorder))
    await srv.serve_unix(short_tmp / "i.sock")
    client = await Client.connect_unix(f"unix://{short_tmp / 'i.sock'}")
    try:
        assert (await echo(client, "x")).value == "x"
        with pytest.raises(errors.PermissionDenied):
            await client.call(SERVICE, "Boom", KeyValue(), KeyValue)
        with pytest.raises(errors.NotFound):
            await client.call(SERVICE, "Fail", KeyValue(key="NotFound", value="nf"), KeyValue)
        assert seen == [("Echo", "KeyValue"), ("Boom", "KeyValue"), ("Fail", "KeyValue")]
    finally:
        await client.close()
        await srv.close()


def test_register_twice_is_refused() -> None:
    srv = Server()
    srv.register(SERVICE, {})
    with pytest.raises(errors.AlreadyExists):
        srv.register(SERVICE, {})


# -- message size ----------------------------------------------------------------------------------


def _request_of_exact_size(size: int, sid_payload_key: str = "k") -> bytes:
    """A valid Echo Request envelope whose serialized length is exactly ``size``."""
    for pad in range(size - 64, size):
        body = Request(
            service=SERVICE,
            method="Echo",
            payload=KeyValue(key=sid_payload_key, value="x" * pad).SerializeToString(),
        ).SerializeToString()
        if len(body) == size:
            return body
    raise AssertionError("no padding hits the size")


async def test_request_of_exactly_max_size_is_served(raw: RawConn) -> None:
    body = _request_of_exact_size(MAX_MESSAGE_SIZE)
    await raw.send(encode_frame(Frame(1, FrameType.REQUEST, 0, body)))
    sid, resp = await raw.recv_response()
    assert sid == 1 and not resp.HasField("status")
    assert (
        KeyValue.FromString(resp.payload).value == KeyValue.FromString(Request.FromString(body).payload).value
    )


async def test_oversized_incoming_frame_answers_then_closes(raw: RawConn, sock_path: Path) -> None:
    header = struct.pack(">IIBB", MAX_MESSAGE_SIZE + 1, 5, FrameType.REQUEST, 0)
    await raw.send(header + b"\0" * 1000)
    sid, resp = await raw.recv_response()
    assert (sid, resp.status.code) == (5, Code.RESOURCE_EXHAUSTED)
    assert await raw.recv() is None
    # Other connections are not affected.
    client = await Client.connect_unix(sock_path)
    try:
        assert (await echo(client, "still")).value == "still"
    finally:
        await client.close()


async def test_client_refuses_to_send_oversized(client: Client) -> None:
    with pytest.raises(errors.ResourceExhausted):
        await echo(client, "x" * MAX_MESSAGE_SIZE)
    assert (await echo(client, "ok")).value == "ok"


async def test_oversized_response_becomes_resource_exhausted(client: Client) -> None:
    with pytest.raises(errors.ResourceExhausted):
        await client.call(SERVICE, "Big", KeyValue(value=str(MAX_MESSAGE_SIZE)), KeyValue)
    big = await client.call(SERVICE, "Big", KeyValue(value=str(MAX_MESSAGE_SIZE - 64)), KeyValue)
    assert len(big.value) == MAX_MESSAGE_SIZE - 64


async def test_client_treats_oversized_incoming_frame_as_broken_connection() -> None:
    a, b = socket.socketpair()
    client = Client.from_stream(*await asyncio.open_connection(sock=a))
    peer = RawConn(*await asyncio.open_connection(sock=b))
    try:
        call = asyncio.create_task(echo(client))
        await peer.recv()
        await peer.send(struct.pack(">IIBB", MAX_MESSAGE_SIZE + 1, 1, FrameType.RESPONSE, 0))
        with pytest.raises(errors.Unavailable):
            await call
        assert client.closed
        await asyncio.wait_for(client.wait_closed(), 5)
    finally:
        await client.close()
        await peer.close()


# -- protocol errors -------------------------------------------------------------------------------


async def test_even_stream_id_is_invalid_argument_and_connection_survives(raw: RawConn) -> None:
    await raw.request(2, SERVICE, "Echo", KeyValue(value="e").SerializeToString())
    sid, resp = await raw.recv_response()
    assert (sid, resp.status.code) == (2, Code.INVALID_ARGUMENT)
    assert "odd" in resp.status.message
    await raw.request(3, SERVICE, "Echo", KeyValue(value="o").SerializeToString())
    sid, resp = await raw.recv_response()
    assert sid == 3 and KeyValue.FromString(resp.payload).value == "o"


async def test_unknown_frame_types_and_data_frames_are_ignored(raw: RawConn) -> None:
    for ftype in (FrameType.DATA, FrameType.RESPONSE, 0, 4, 200):
        await raw.send(encode_frame(Frame(1, ftype, 0x07, b"whatever")))
    await raw.request(1, SERVICE, "Echo", KeyValue(value="after").SerializeToString())
    sid, resp = await raw.recv_response()
    assert sid == 1 and KeyValue.FromString(resp.payload).value == "after"


async def test_garbage_envelope_closes_only_that_connection(raw: RawConn, sock_path: Path) -> None:
    other = await Client.connect_unix(sock_path)
    try:
        await raw.send(encode_frame(Frame(1, FrameType.REQUEST, 0, b"\xff\xff\xff\xff")))
        assert await raw.recv() is None
        assert (await echo(other, "unaffected")).value == "unaffected"
    finally:
        await other.close()


async def test_stream_id_reuse_while_active_closes_connection(raw: RawConn) -> None:
    payload = KeyValue(key="reuse", value="30").SerializeToString()
    await raw.request(1, SERVICE, "Sleep", payload)
    await raw.request(1, SERVICE, "Sleep", payload)
    assert await raw.recv() is None


async def test_peer_with_other_uid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeSock:
        family = socket.AF_UNIX

        def getsockopt(self, *_a: object) -> bytes:
            return struct.pack("3i", 4242, 1000, 1000)

    class FakeWriter:
        def get_extra_info(self, name: str) -> object:
            return FakeSock() if name == "socket" else None

    monkeypatch.setattr(server_mod.os, "geteuid", lambda: 2000)
    assert "peer uid 1000" in server_mod._peer_refusal(FakeWriter())
    monkeypatch.setattr(server_mod.os, "geteuid", lambda: 1000)
    assert server_mod._peer_refusal(FakeWriter()) is None


# -- connection loss and shutdown ------------------------------------------------------------------


async def test_connection_loss_fails_pending_calls_with_unavailable(
    server: Server, unix_client: Client, recorder: Recorder
) -> None:
    calls = [
        asyncio.create_task(unix_client.call(SERVICE, "Sleep", KeyValue(key=str(i), value="60"), KeyValue))
        for i in range(5)
    ]
    await recorder.until(lambda: len(recorder.started) == 5)
    await server.close()
    for call in calls:
        with pytest.raises(errors.Unavailable):
            await asyncio.wait_for(call, 5)
    await asyncio.wait_for(unix_client.wait_closed(), 5)
    assert unix_client.closed
    with pytest.raises(errors.Unavailable):
        await echo(unix_client)
    assert sorted(recorder.cancelled) == ["0", "1", "2", "3", "4"]


async def test_peer_eof_over_socketpair_fails_pending_calls() -> None:
    a, b = socket.socketpair()
    client = Client.from_stream(*await asyncio.open_connection(sock=a))
    peer = RawConn(*await asyncio.open_connection(sock=b))
    call = asyncio.create_task(echo(client))
    await peer.recv()
    await peer.close()
    with pytest.raises(errors.Unavailable):
        await call
    await client.close()


async def test_connect_to_nothing_is_unavailable(short_tmp: Path) -> None:
    with pytest.raises(errors.Unavailable):
        await Client.connect_unix(short_tmp / "missing.sock", timeout=1)


async def test_cancelling_a_call_propagates_and_forgets_it(client: Client) -> None:
    call = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(key="c", value="30"), KeyValue))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert client._pending == {}
    assert (await echo(client, "next")).value == "next"


async def test_serve_unix_with_inherited_listening_socket(recorder: Recorder, short_tmp: Path) -> None:
    path = short_tmp / "fd3.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(16)
    srv = Server()
    srv.register(SERVICE, make_methods(recorder))
    await srv.serve_unix(sock=lsock)
    client = await Client.connect_unix(path)
    try:
        assert (await echo(client, "fd")).value == "fd"
    finally:
        await client.close()
        await srv.close()
    with pytest.raises(ValueError):
        await Server().serve_unix()


async def test_serve_stream_returns_when_peer_closes(server: Server) -> None:
    a, b = socket.socketpair()
    serving = asyncio.create_task(server.serve_stream(*await asyncio.open_connection(sock=a)))
    client = Client.from_stream(*await asyncio.open_connection(sock=b))
    assert (await echo(client)).value == "v"
    await client.close()
    await asyncio.wait_for(serving, 5)
    assert serving.result() is None


async def test_clean_shutdown_leaves_no_tasks(recorder: Recorder, short_tmp: Path) -> None:
    before = asyncio.all_tasks()
    srv = Server()
    srv.register(SERVICE, make_methods(recorder))
    await srv.serve_unix(short_tmp / "s.sock")
    a, b = socket.socketpair()
    stream_task = asyncio.create_task(srv.serve_stream(*await asyncio.open_connection(sock=a)))
    clients = [await Client.connect_unix(short_tmp / "s.sock") for _ in range(3)]
    clients.append(Client.from_stream(*await asyncio.open_connection(sock=b)))
    hanging = [
        asyncio.create_task(c.call(SERVICE, "Sleep", KeyValue(key=f"h{i}", value="3600"), KeyValue))
        for i, c in enumerate(clients)
    ]
    for c in clients:
        assert (await echo(c)).value == "v"
    await recorder.until(lambda: len(recorder.started) == len(clients))
    await srv.close()
    await asyncio.wait_for(stream_task, 5)
    for h in hanging:
        with pytest.raises(errors.Unavailable):
            await asyncio.wait_for(h, 5)
    for c in clients:
        await c.close()
    await srv.close()  # idempotent
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert leftover == []
    assert len(recorder.cancelled) == len(clients)
    assert srv._connections == set()


async def test_failures_are_logged_once_with_reason(recorder: Recorder, short_tmp: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        srv = Server()
        srv.register(SERVICE, make_methods(recorder))
        await srv.serve_unix(short_tmp / "l.sock")
        client = await Client.connect_unix(short_tmp / "l.sock")
        raw = await RawConn.open(short_tmp / "l.sock")
        try:
            with pytest.raises(errors.Internal):
                await client.call(SERVICE, "Boom", KeyValue(), KeyValue)
            await raw.send(struct.pack(">IIBB", MAX_MESSAGE_SIZE + 1, 1, FrameType.REQUEST, 0))
            await raw.recv_response()
            assert await raw.recv() is None
        finally:
            await raw.close()
            await client.close()
            await srv.close()
    failed = [e for e in logs if e["event"] == "ttrpc handler failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error" and failed[0]["exc_info"]
    closed = [e for e in logs if e["event"] == "ttrpc connection closed"]
    assert len(closed) == 1 and "exceeds maximum message size" in closed[0]["reason"]


async def test_cancelling_serve_stream_cancels_its_handlers(server: Server, recorder: Recorder) -> None:
    a, b = socket.socketpair()
    serving = asyncio.create_task(server.serve_stream(*await asyncio.open_connection(sock=a)))
    client = Client.from_stream(*await asyncio.open_connection(sock=b))
    call = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(key="s", value="60"), KeyValue))
    await recorder.until(lambda: "s" in recorder.started)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert recorder.cancelled == ["s"]
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(call, 5)
    await client.close()


async def test_close_does_not_hang_on_a_peer_that_never_reads(
    server: Server, raw: RawConn, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire_mod, "CLOSE_GRACE", 0.5)
    big = KeyValue(value=str(MAX_MESSAGE_SIZE - 64)).SerializeToString()
    for i in range(8):  # ~32 MiB of responses that nobody reads
        await raw.request(1 + 2 * i, SERVICE, "Big", big)
    await asyncio.sleep(0.5)
    async with asyncio.timeout(15):
        await server.close()
    assert server._connections == set()


async def test_peer_going_away_cancels_its_in_flight_handlers(raw: RawConn, recorder: Recorder) -> None:
    await raw.request(1, SERVICE, "Sleep", KeyValue(key="gone", value="60").SerializeToString())
    await recorder.until(lambda: "gone" in recorder.started)
    await raw.close()
    await recorder.until(lambda: "gone" in recorder.cancelled)
