"""Eager Methods (started inside dispatch, a task only once they suspend) and the hand-made encodings."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Recorder, make_methods

from shim import errors
from shim._pb.ttrpc.request_pb2 import KeyValue, Request, Response
from shim.ttrpc import CallContext, Client, Frame, FrameDecoder, FrameType, Method, Server, encode_frame
from shim.ttrpc._wire import frame_bytes, ok_response, varint
from shim.ttrpc.server import _Continue

EAGER = "test.v1.Eager"

_var: contextvars.ContextVar[str] = contextvars.ContextVar("_var", default="unset")


def eager_methods(rec: Recorder) -> dict[str, Method]:
    methods = {name: dataclasses.replace(m, eager=True) for name, m in make_methods(rec).items()}

    async def where(req: KeyValue, ctx: CallContext) -> KeyValue:
        # Reports whether it runs in a task, and leaves a contextvar set that must not leak.
        seen = _var.get()
        _var.set(req.value)
        return KeyValue(key="task" if asyncio.current_task() else "none", value=seen)

    async def then_task(req: KeyValue, ctx: CallContext) -> KeyValue:
        await asyncio.sleep(0)
        return KeyValue(key="task" if asyncio.current_task() else "none", value=_var.get())

    async def cancels_itself(req: KeyValue, ctx: CallContext) -> KeyValue:
        raise asyncio.CancelledError

    for name, fn in (("Where", where), ("ThenTask", then_task), ("CancelsItself", cancels_itself)):
        methods[name] = Method(KeyValue, KeyValue, fn, eager=True)
    return methods


@pytest.fixture
async def eager_server(recorder: Recorder) -> AsyncIterator[Server]:
    srv = Server()
    srv.register(EAGER, eager_methods(recorder))
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def eager_unix(eager_server: Server, short_tmp: Path) -> AsyncIterator[Client]:
    path = short_tmp / "e.sock"
    await eager_server.serve_unix(path)
    client = await Client.connect_unix(path)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def eager_stream(eager_server: Server) -> AsyncIterator[Client]:
    a, b = socket.socketpair()
    serving = asyncio.create_task(eager_server.serve_stream(*await asyncio.open_connection(sock=a)))
    client = Client.from_stream(*await asyncio.open_connection(sock=b))
    try:
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(serving, 10)


@pytest.fixture(params=["unix", "stream"])
def eclient(request: pytest.FixtureRequest) -> Client:
    return request.getfixturevalue(f"eager_{request.param}")


async def call(client: Client, method: str, value: str = "v", key: str = "k", **kw: object) -> KeyValue:
    return await client.call(EAGER, method, KeyValue(key=key, value=value), KeyValue, **kw)


async def test_synchronous_eager_call_runs_outside_a_task_in_its_own_context(
    eclient: Client, request: pytest.FixtureRequest
) -> None:
    first = await call(eclient, "Where", "a", timeout=2)
    # serve_stream dispatches inside its read task, so there eager methods get tasks as usual.
    in_task = "stream" in request.node.callspec.id
    assert (first.key, first.value) == ("task" if in_task else "none", "unset")
    second = await call(eclient, "Where", "b", timeout=2)
    assert second.value == "unset"  # the first call's contextvar did not leak
    assert (await call(eclient, "Echo", "e", timeout=2)).value == "e"


async def test_suspending_eager_call_continues_in_a_task(eclient: Client) -> None:
    r = await call(eclient, "ThenTask", timeout=2)
    assert r.key == "task"


async def test_suspended_eager_call_does_not_block_others(eclient: Client, recorder: Recorder) -> None:
    slow = asyncio.create_task(call(eclient, "Sleep", "1.0", key="slow"))
    await recorder.until(lambda: "slow" in recorder.started)
    assert (await call(eclient, "Echo", "fast")).value == "fast"
    assert not slow.done()
    assert (await slow).value == "slept"


async def test_eager_call_deadline_cancels_it_once_suspended(
    eager_server: Server, short_tmp: Path, recorder: Recorder
) -> None:
    path = short_tmp / "d.sock"
    await eager_server.serve_unix(path)
    reader, writer = await asyncio.open_unix_connection(path)
    req = Request(
        service=EAGER,
        method="Sleep",
        payload=KeyValue(key="d", value="30").SerializeToString(),
        timeout_nano=300_000_000,
    )
    writer.write(encode_frame(Frame(1, FrameType.REQUEST, 0, req.SerializeToString())))
    await writer.drain()
    async with asyncio.timeout(10):
        frames = FrameDecoder().feed(
            await reader.readexactly(10 + 31)
        )  # status{4, "context deadline exceeded"}
    writer.close()
    status = Response.FromString(frames[0].data).status
    assert (status.code, status.message) == (errors.Code.DEADLINE_EXCEEDED, "context deadline exceeded")
    await recorder.until(lambda: "d" in recorder.cancelled)


@pytest.mark.parametrize(
    ("method", "key", "exc"),
    [
        ("Fail", "NotFound", errors.NotFound),
        ("Boom", "", errors.Internal),
        ("TimeoutError", "", errors.DeadlineExceeded),
        ("CancelsItself", "", errors.Cancelled),
    ],
)
async def test_eager_errors_are_mapped(eclient: Client, method: str, key: str, exc: type) -> None:
    with pytest.raises(exc):
        await call(eclient, method, key=key, timeout=2)
    assert (await call(eclient, "Echo", "after")).value == "after"


async def test_eager_handler_cancelled_when_peer_goes_away(
    eager_server: Server, short_tmp: Path, recorder: Recorder
) -> None:
    path = short_tmp / "g.sock"
    await eager_server.serve_unix(path)
    _reader, writer = await asyncio.open_unix_connection(path)
    req = Request(service=EAGER, method="Sleep", payload=KeyValue(key="gone", value="60").SerializeToString())
    writer.write(encode_frame(Frame(1, FrameType.REQUEST, 0, req.SerializeToString())))
    await writer.drain()
    await recorder.until(lambda: "gone" in recorder.started)
    writer.close()
    await recorder.until(lambda: "gone" in recorder.cancelled)


async def test_eager_answers_before_a_fatal_frame_are_sent(eager_server: Server, short_tmp: Path) -> None:
    """Requests decoded in the same read as an undecodable envelope are still answered."""
    path = short_tmp / "f.sock"
    await eager_server.serve_unix(path)
    reader, writer = await asyncio.open_unix_connection(path)
    script = b"".join(
        encode_frame(
            Frame(sid, FrameType.REQUEST, 0, Request(service=EAGER, method="Echo").SerializeToString())
        )
        for sid in (1, 3, 5)
    ) + encode_frame(Frame(7, FrameType.REQUEST, 0, b"\xff\xff"))
    writer.write(script)
    await writer.drain()
    data = b""
    async with asyncio.timeout(10):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    frames = FrameDecoder().feed(data)
    assert [f.stream_id for f in frames] == [1, 3, 5]
    assert all(not Response.FromString(f.data).HasField("status") for f in frames)


async def test_continue_forwards_cancellation_thrown_before_its_first_step() -> None:
    """A Task cancelled before it ever ran still delivers CancelledError into the handler."""
    seen: list[str] = []
    fut = asyncio.get_running_loop().create_future()
    shared = asyncio.get_running_loop().create_future()

    async def handler() -> str:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "done"

    coro = handler()
    yielded = coro.send(None)
    assert yielded is fut
    task = asyncio.get_running_loop().create_task(_Continue(coro, yielded))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]
    assert fut.cancelled()  # as a Task cancelled while waiting on it would have done

    fut = shared
    coro2 = handler()
    task2 = asyncio.get_running_loop().create_task(_Continue(coro2, coro2.send(None)))
    await asyncio.sleep(0)
    fut.set_result(None)
    assert await task2 == "done"


# -- hand-made encodings are what protobuf would write ---------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 70000, 4 << 20])
def test_ok_response_matches_protobuf(n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert ok_response(payload) == Response(payload=payload).SerializeToString()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 16384, 2**31, 2**63 - 1])
def test_varint_matches_protobuf(n: int) -> None:
    expected = Request(timeout_nano=n).SerializeToString()
    assert (b"\x20" + varint(n) if n else b"") == expected


def test_frame_bytes_matches_encode_frame() -> None:
    for sid, ftype, data in [(1, 1, b""), (3, 2, b"xyz"), (2**32 - 1, 3, b"\x00" * 1000)]:
        assert frame_bytes(sid, ftype, data) == encode_frame(Frame(sid, ftype, 0, data))
