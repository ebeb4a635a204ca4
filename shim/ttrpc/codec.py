"""ttrpc framing, sans-IO: bytes in, frames out, and back.

Wire layout (containerd/ttrpc ``PROTOCOL.md``)::

    | length u32 BE | stream id u32 BE | type u8 | flags u8 | data[length] |

``length`` counts only ``data``; it may be at most ``max_size`` (4 MiB by default, as in Go ttrpc).
Nothing here does IO or knows about protobuf, so both ends (and the fuzz tests) share one parser.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from shim.errors import InvalidArgument, ResourceExhausted

MAX_MESSAGE_SIZE = 4 << 20
"""Largest ``data`` length accepted or sent: 4 MiB, excluding the 10-byte header (Go ttrpc's limit)."""

HEADER_SIZE = 10
MAX_STREAM_ID = (1 << 32) - 1

_HEADER = struct.Struct(">IIBB")


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """Frame flags. Unary calls use none; the others belong to ttrpc >= 1.2 streaming."""

    REMOTE_CLOSED = 0x01
    REMOTE_OPEN = 0x02
    NO_DATA = 0x04


@dataclass(frozen=True)
class Frame:
    """One ttrpc message. ``type`` is an ``int`` so that unknown types survive decoding."""

    stream_id: int
    type: int
    flags: int
    data: bytes


class ProtocolError(InvalidArgument):
    """The byte stream cannot be framed any further (the peer announced an oversized frame).

    The header that caused it has been read, so ``stream_id``, ``frame_type`` and ``length`` say
    which stream to answer with RESOURCE_EXHAUSTED. ``frames`` holds the complete frames that
    preceded the bad header in the same ``feed`` call; they are valid and should still be handled.
    """

    def __init__(
        self,
        message: str,
        *,
        stream_id: int,
        frame_type: int,
        length: int,
        frames: list[Frame] | None = None,
    ) -> None:
        super().__init__(message, stream_id=stream_id, frame_type=frame_type, length=length)
        self.stream_id = stream_id
        self.frame_type = frame_type
        self.length = length
        self.frames: list[Frame] = frames if frames is not None else []


def encode_frame(frame: Frame, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """Header + data for ``frame``.

    Raises ``shim.errors.ResourceExhausted`` if ``len(frame.data) > max_size`` (nothing is sent, like
    Go's ``OversizedMessageError``) and ``ValueError`` if a header field does not fit its width.
    """
    n = len(frame.data)
    if n > max_size:
        raise ResourceExhausted(
            f"message length {n} exceeds maximum message size of {max_size}", length=n, max_size=max_size
        )
    if not 0 <= frame.stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream_id} out of range")
    if not (0 <= frame.type <= 0xFF and 0 <= frame.flags <= 0xFF):
        raise ValueError(f"frame type {frame.type} or flags {frame.flags} out of range")
    return _HEADER.pack(n, frame.stream_id, frame.type, frame.flags) + bytes(frame.data)


class FrameDecoder:
    """Incremental decoder: ``feed`` it whatever the transport delivered, get back complete frames.

    Memory is bounded: at most one partial frame (``max_size + 10`` bytes) is buffered besides the
    bytes of the current ``feed`` call. After a ``ProtocolError`` the decoder is broken for good:
    every later ``feed`` raises the same error (the stream position is lost, so the connection
    must be closed).
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return the frames it completed, in order.

        Raises ``ProtocolError`` (an ``InvalidArgument``) when a header announces more than
        ``max_size`` bytes of data; frames completed before it are in ``error.frames``.
        """
        if self._error is not None:
            raise ProtocolError(
                str(self._error),
                stream_id=self._error.stream_id,
                frame_type=self._error.frame_type,
                length=self._error.length,
            )
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            length, stream_id, ftype, flags = _HEADER.unpack_from(buf, pos)
            if length > self.max_size:
                del buf[:]
                self._error = ProtocolError(
                    f"message length {length} exceeds maximum message size of {self.max_size}",
                    stream_id=stream_id,
                    frame_type=ftype,
                    length=length,
                    frames=frames,
                )
                raise self._error
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append(Frame(stream_id, ftype, flags, bytes(buf[start : start + length])))
            pos = start + length
        if pos:
            del buf[:pos]
        return frames


__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_STREAM_ID",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "ProtocolError",
    "encode_frame",
]
