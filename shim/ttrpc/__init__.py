"""ttrpc: containerd's lightweight RPC protocol, our own implementation (unary calls only).

Used on the host (task API served to containerd, events published to containerd, the agent client)
and inside the guest (the agent's server on the virtio-serial port), so this package imports only
the standard library, protobuf, ``shim._pb.ttrpc``, ``shim.errors`` and ``shim.log``.

- ``codec``: sans-IO framing (``Frame``, ``encode_frame``, ``FrameDecoder``), 4 MiB limit.
- ``server``: ``Server`` with ``Method``/``CallContext``/``Interceptor``.
- ``client``: ``Client``.
"""

from shim.ttrpc.client import Client
from shim.ttrpc.codec import (
    MAX_MESSAGE_SIZE,
    Flags,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    encode_frame,
)
from shim.ttrpc.server import CallContext, Interceptor, Method, Server

__all__ = [
    "MAX_MESSAGE_SIZE",
    "CallContext",
    "Client",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Interceptor",
    "Method",
    "ProtocolError",
    "Server",
    "encode_frame",
]
