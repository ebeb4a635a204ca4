"""Malformed input thrown at a running ttrpc server: it must not crash, must keep answering a
healthy connection, and must not grow without bound.

Each fuzz connection carries a run of frames the server survives (unknown types, Data and Response
frames, even stream ids, unknown services and methods, garbage payloads, envelopes that may or may
not decode, random flags) and ends in one of the ways that close it (oversized length, undecodable
envelope, EOF inside a header or a frame, plain EOF).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import structlog
from conftest import SERVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim._pb.ttrpc.request_pb2 import KeyValue, Request, Response
from shim.errors import Code
from shim.ttrpc import Client, Frame, FrameDecoder, FrameType, Server, encode_frame
from shim.ttrpc.codec import MAX_MESSAGE_SIZE

FRAMES = 100_000
PARALLEL = 4


@pytest.fixture(autouse=True)
def quiet_logs():
    """The server logs every closed connection; thousands of those would only slow the test."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        yield
    finally:
        structlog.reset_defaults()


def _request(service: str, method: str, payload: bytes = b"", **kw: object) -> bytes:
    return Request(service=service, method=method, payload=payload, **kw).SerializeToString()


def _frame(sid: int, ftype: int, flags: int, data: bytes) -> bytes:
    return encode_frame(Frame(sid, ftype, flags, data))


def survivable_frame(rng: random.Random, next_sid: list[int]) -> bytes:
    """One frame the server must answer or ignore without closing the connection."""

    def odd() -> int:
        sid = next_sid[0]
        next_sid[0] += 2
        return sid

    kind = rng.randrange(9)
    blob = rng.randbytes(rng.randrange(64))
    if kind == 0:  # unknown type
        return _frame(rng.getrandbits(32), rng.choice([0, *range(4, 256)]), rng.getrandbits(8), blob)
    if kind == 1:  # streaming data / a response sent to a server: ignored
        return _frame(
            rng.getrandbits(32), rng.choice([FrameType.DATA, FrameType.RESPONSE]), rng.getrandbits(8), blob
        )
    if kind == 2:  # even stream id
        return _frame(rng.randrange(0, 2**32, 2), FrameType.REQUEST, 0, _request(SERVICE, "Echo"))
    if kind == 3:  # unknown service
        return _frame(odd(), FrameType.REQUEST, 0, _request(f"svc{rng.random()}", "Echo"))
    if kind == 4:  # unknown method
        return _frame(odd(), FrameType.REQUEST, 0, _request(SERVICE, f"M{rng.random()}"))
    if kind == 5:  # garbage payload for a real method
        return _frame(odd(), FrameType.REQUEST, 0, _request(SERVICE, "Echo", blob))
    if kind == 6:  # a good call with random flags and metadata
        payload = KeyValue(key="f", value=str(rng.random())).SerializeToString()
        return _frame(
            odd(),
            FrameType.REQUEST,
            rng.getrandbits(8),
            _request(
                SERVICE,
                "Echo",
                payload,
                metadata=[{"key": "K", "value": "v"}],
                timeout_nano=rng.getrandbits(40),
            ),
        )
    if kind == 7:  # an envelope with unknown fields appended (forward compat)
        return _frame(odd(), FrameType.REQUEST, 0, _request(SERVICE, "Echo") + b"\xa8\x1f\x01")
    # kind 8: an empty request envelope: service "" is unknown
    return _frame(odd(), FrameType.REQUEST, 0, b"")


def fatal_tail(rng: random.Random) -> bytes:
    """How a fuzz connection ends; each is either a closing error or EOF."""
    kind = rng.randrange(6)
    if kind == 0:  # oversized length, the server answers RESOURCE_EXHAUSTED and closes
        n = rng.randrange(MAX_MESSAGE_SIZE + 1, 2**32)
        return struct.pack(">IIBB", n, rng.getrandbits(32), rng.randrange(256), 0) + rng.randbytes(100)
    if kind == 1:  # undecodable envelope (field 0 / truncated varint / bad wire type)
        garbage = rng.choice([b"\x00", b"\xff\xff\xff\xff", b"\x0a\xff", b"\x0f" + rng.randbytes(8)])
        return _frame(1 + 2 * rng.randrange(1000), FrameType.REQUEST, 0, garbage)
    if kind == 2:  # random bytes as an envelope: may decode (then: unknown service) or not (closed)
        return _frame(100_001, FrameType.REQUEST, 0, rng.randbytes(rng.randrange(1, 200)))
    if kind == 3:  # EOF inside a frame
        return struct.pack(">IIBB", 500, 1, 1, 0) + rng.randbytes(rng.randrange(500))
    if kind == 4:  # EOF inside a header
        return rng.randbytes(rng.randrange(1, 10))
    return b""


async def _drain(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read until EOF; return how many bytes came and a prefix for inspection."""
    got = bytearray()
    total = 0
    try:
        while data := await reader.read(65536):
            total += len(data)
            if len(got) < 4096:
                got += data
    except OSError:
        pass
    return total, bytes(got)


async def _throw(path: Path, script: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    drain = asyncio.create_task(_drain(reader))
    try:
        writer.write(script)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass  # the server may close as soon as it sees a fatal frame
    try:
        async with asyncio.timeout(30):
            await drain
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
async def test_fuzz_100k_malformed_frames(server: Server, sock_path: Path) -> None:
    rng = random.Random(0x77C)
    healthy = await Client.connect_unix(sock_path)
    thrown = 0
    connections = 0
    baseline: tuple[int, int] | None = None

    async def one_connection() -> int:
        next_sid = [1]
        n = rng.randrange(1, 200)
        script = b"".join(survivable_frame(rng, next_sid) for _ in range(n)) + fatal_tail(rng)
        await _throw(sock_path, script)
        return n + 1

    try:
        while thrown < FRAMES:
            counts = await asyncio.gather(*(one_connection() for _ in range(PARALLEL)))
            thrown += sum(counts)
            connections += PARALLEL
            # The healthy connection is answered throughout.
            reply = await healthy.call(SERVICE, "Echo", KeyValue(value=str(thrown)), KeyValue, timeout=10)
            assert reply.value == str(thrown)
            if baseline is None and thrown > FRAMES // 10:
                gc.collect()
                tracemalloc.start()
                baseline = (tracemalloc.get_traced_memory()[0], _rss())
        assert baseline is not None
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - baseline[0]
        print(f"fuzz: {thrown} frames over {connections} connections; traced +{traced_growth} B")
        if traced_growth > 2 << 20:
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:15]:
                print(stat)
        rss_growth = _rss() - baseline[1]
        tracemalloc.stop()
        # Only the healthy connection is left and nothing is buffered or pending.
        assert len(server._connections) == 1
        assert healthy._pending == {}
        assert traced_growth < 2 << 20, f"traced memory grew by {traced_growth} bytes"
        assert rss_growth < 16 << 20, f"RSS grew by {rss_growth} bytes"
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await healthy.close()
    assert thrown >= FRAMES
    assert connections > 0


# -- structured cases (hypothesis) -----------------------------------------------------------------

frame_kinds = st.sampled_from(
    ["good", "even", "unknown_service", "unknown_method", "bad_payload", "data", "other"]
)
tails = st.sampled_from(["none", "oversized", "garbage", "truncated"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(frame_kinds, max_size=30), tail=tails, flags=st.integers(0, 255))
async def test_structured_frames_get_exactly_the_right_answers(
    server: Server, sock_path: Path, kinds: list[str], tail: str, flags: int
) -> None:
    expected: dict[int, int] = {}  # stream id -> status code
    script = bytearray()
    sid = 1
    for i, kind in enumerate(kinds):
        if kind == "good":
            payload = KeyValue(value=str(i)).SerializeToString()
            script += _frame(sid, FrameType.REQUEST, flags, _request(SERVICE, "Echo", payload))
            expected[sid] = Code.OK
        elif kind == "even":
            script += _frame(sid + 1, FrameType.REQUEST, 0, _request(SERVICE, "Echo"))
            expected[sid + 1] = Code.INVALID_ARGUMENT
        elif kind == "unknown_service":
            script += _frame(sid, FrameType.REQUEST, 0, _request("nope.Svc", "Echo"))
            expected[sid] = Code.UNIMPLEMENTED
        elif kind == "unknown_method":
            script += _frame(sid, FrameType.REQUEST, 0, _request(SERVICE, "Nope"))
            expected[sid] = Code.UNIMPLEMENTED
        elif kind == "bad_payload":
            script += _frame(sid, FrameType.REQUEST, 0, _request(SERVICE, "Echo", b"\xff"))
            expected[sid] = Code.INVALID_ARGUMENT
        elif kind == "data":
            script += _frame(sid, FrameType.DATA, flags, b"\x01\x02")
        else:
            script += _frame(sid, 0x42, flags, b"?")
        sid += 2
    if tail == "oversized":
        script += struct.pack(">IIBB", MAX_MESSAGE_SIZE + 1, sid, FrameType.REQUEST, 0)
        expected[sid] = Code.RESOURCE_EXHAUSTED
    elif tail == "garbage":
        script += _frame(sid, FrameType.REQUEST, 0, b"\xff\xff")
    elif tail == "truncated":
        script += struct.pack(">IIBB", 50, sid, FrameType.REQUEST, 0) + b"\x0a"

    reader, writer = await asyncio.open_unix_connection(sock_path)
    decoder = FrameDecoder()
    frames: list[Frame] = []
    try:
        writer.write(bytes(script))
        await writer.drain()
        async with asyncio.timeout(20):
            # Collect every expected answer before half-closing: like Go ttrpc, the server cancels
            # what is still running when the client goes away.
            while len(frames) < len(expected) and (data := await reader.read(65536)):
                frames += decoder.feed(data)
            if not writer.is_closing():
                writer.write_eof()
            _, rest = await _drain(reader)
            frames += decoder.feed(rest)
    finally:
        writer.close()
    answers = {f.stream_id: Response.FromString(f.data) for f in frames}
    assert {s: r.status.code for s, r in answers.items()} == expected
    for s, r in answers.items():
        if expected[s] == Code.OK:
            assert not r.HasField("status")
    # and the server is still fine for everyone else
    client = await Client.connect_unix(sock_path)
    try:
        assert (await client.call(SERVICE, "Echo", KeyValue(value="ok"), KeyValue, timeout=10)).value == "ok"
    finally:
        await client.close()
