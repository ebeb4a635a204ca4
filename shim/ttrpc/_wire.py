"""Envelope helpers shared by client and server: metadata and status on ``ttrpc.Request/Response``."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Iterable, Mapping, Sequence

from shim._pb.ttrpc import request_pb2

READ_CHUNK = 256 * 1024
"""How much one transport read asks for; big enough that a 4 MiB message takes few reads."""


def metadata_to_wire(metadata: Mapping[str, str | Sequence[str]] | None) -> list[request_pb2.KeyValue]:
    """One ``KeyValue`` per value, keys lower-cased (Go ttrpc ``MD.setRequest``)."""
    if not metadata:
        return []
    out: list[request_pb2.KeyValue] = []
    for key, values in metadata.items():
        k = key.lower()
        if isinstance(values, str):
            out.append(request_pb2.KeyValue(key=k, value=values))
        else:
            out.extend(request_pb2.KeyValue(key=k, value=v) for v in values)
    return out


def metadata_from_wire(pairs: Iterable[request_pb2.KeyValue]) -> dict[str, list[str]]:
    md: dict[str, list[str]] = {}
    for kv in pairs:
        md.setdefault(kv.key.lower(), []).append(kv.value)
    return md


def error_response(code: int, message: str) -> bytes:
    """A serialized ``Response`` carrying only a status."""
    resp = request_pb2.Response()
    resp.status.code = int(code)
    resp.status.message = message
    return resp.SerializeToString()


def ok_response(payload: bytes) -> bytes:
    """A serialized successful ``Response``: no ``status`` field at all, like the Go server.

    Encoded by hand (field 2, length-delimited: tag 0x12, varint length, bytes): this is every
    successful answer, and it is what protobuf would write, byte for byte (pinned by a test).
    """
    if not payload:
        return b""
    return b"\x12" + varint(len(payload)) + payload


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of ``n >= 0``."""
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [bytes([i]) for i in range(0x80)]

_HEADER = struct.Struct(">IIBB")


def frame_bytes(stream_id: int, frame_type: int, data: bytes, flags: int = 0) -> bytes:
    """Header + ``data``, for callers that checked ``len(data)`` and the header fields themselves
    (``codec.encode_frame`` is the checking version)."""
    return _HEADER.pack(len(data), stream_id, frame_type, flags) + data


CLOSE_GRACE = 5.0
"""Seconds a closing connection may spend flushing what is buffered before it is aborted."""


async def close_writer(writer: asyncio.StreamWriter, grace: float | None = None) -> None:
    """Close ``writer``, letting buffered bytes drain for at most ``grace`` seconds (default
    ``CLOSE_GRACE``), then abort.

    A peer that stops reading must not be able to hang a close forever. Never raises (except
    ``CancelledError``).
    """
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE if grace is None else grace):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except (OSError, RuntimeError):
        pass  # the peer is gone already; nothing left to flush
    with contextlib.suppress(OSError, RuntimeError):
        await writer.wait_closed()
