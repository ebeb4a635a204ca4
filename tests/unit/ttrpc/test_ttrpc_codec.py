"""ttrpc framing: layout, round-trips under any chunking, and the 4 MiB boundary."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim import errors
from shim.ttrpc.codec import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode_frame,
)

frames_st = st.builds(
    Frame,
    stream_id=st.integers(0, 2**32 - 1),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    data=st.binary(max_size=300),
)


def test_header_layout_matches_go_ttrpc() -> None:
    # State(id="c1") as sent by containerd to the runc shim (notes §2.2, verified on the wire).
    body = bytes.fromhex("0a17") + b"containerd.task.v2.Task" + bytes.fromhex("1205") + b"State"
    body += bytes.fromhex("1a040a02") + b"c1"
    wire = encode_frame(Frame(1, FrameType.REQUEST, 0, body))
    assert wire[:HEADER_SIZE] == bytes.fromhex("00000026 00000001 01 00")
    assert FrameDecoder().feed(wire) == [Frame(1, 1, 0, body)]


def test_max_message_size_is_4mib() -> None:
    assert MAX_MESSAGE_SIZE == 4 * 1024 * 1024


def test_exactly_max_size_round_trips() -> None:
    data = bytes(random.Random(1).getrandbits(8) for _ in range(256)) * (MAX_MESSAGE_SIZE // 256)
    assert len(data) == MAX_MESSAGE_SIZE
    wire = encode_frame(Frame(7, FrameType.RESPONSE, 0, data))
    dec = FrameDecoder()
    out = []
    for i in range(0, len(wire), 65536):
        out += dec.feed(wire[i : i + 65536])
    assert out == [Frame(7, FrameType.RESPONSE, 0, data)]
    assert dec.buffered == 0


def test_encode_refuses_max_plus_one() -> None:
    with pytest.raises(errors.ResourceExhausted):
        encode_frame(Frame(1, FrameType.REQUEST, 0, b"\0" * (MAX_MESSAGE_SIZE + 1)))


def test_decode_refuses_max_plus_one_from_header_alone() -> None:
    dec = FrameDecoder()
    header = (MAX_MESSAGE_SIZE + 1).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\x01\x00"
    with pytest.raises(ProtocolError) as ei:
        dec.feed(header)
    assert isinstance(ei.value, errors.InvalidArgument)
    assert (ei.value.stream_id, ei.value.frame_type, ei.value.length) == (9, 1, MAX_MESSAGE_SIZE + 1)
    # Broken for good: the position in the stream is lost.
    with pytest.raises(ProtocolError):
        dec.feed(b"\0" * 20)


def test_frames_before_an_oversized_header_are_kept() -> None:
    good = encode_frame(Frame(1, 1, 0, b"ok"))
    bad = (0xFFFFFFFF).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"\x01\x00"
    with pytest.raises(ProtocolError) as ei:
        FrameDecoder().feed(good + bad)
    assert ei.value.frames == [Frame(1, 1, 0, b"ok")]


def test_custom_max_size() -> None:
    assert encode_frame(Frame(1, 1, 0, b"abc"), max_size=3)
    with pytest.raises(errors.ResourceExhausted):
        encode_frame(Frame(1, 1, 0, b"abcd"), max_size=3)
    with pytest.raises(ProtocolError):
        FrameDecoder(max_size=3).feed(encode_frame(Frame(1, 1, 0, b"abcd")))


@pytest.mark.parametrize("field", ["stream_id", "type", "flags"])
def test_encode_rejects_out_of_range_header_fields(field: str) -> None:
    kwargs = {"stream_id": 1, "type": 1, "flags": 0, "data": b""}
    kwargs[field] = 2**32 if field == "stream_id" else 256
    with pytest.raises(ValueError):
        encode_frame(Frame(**kwargs))


def test_empty_data_and_partial_header() -> None:
    wire = encode_frame(Frame(1, 2, 0, b""))
    dec = FrameDecoder()
    assert dec.feed(wire[:9]) == []
    assert dec.buffered == 9
    assert dec.feed(wire[9:]) == [Frame(1, 2, 0, b"")]


@given(st.lists(frames_st, max_size=20), st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_round_trip_under_any_chunking(frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    pos, i = 0, 0
    while pos < len(wire):
        n = cuts[i % len(cuts)]
        out += dec.feed(wire[pos : pos + n])
        pos += n
        i += 1
    assert out == frames
    assert dec.buffered == 0


@given(st.binary(max_size=2000))
def test_decoder_never_buffers_more_than_one_frame(blob: bytes) -> None:
    dec = FrameDecoder(max_size=1024)
    try:
        for i in range(0, len(blob), 7):
            dec.feed(blob[i : i + 7])
    except ProtocolError:
        return
    assert dec.buffered <= HEADER_SIZE + 1024
