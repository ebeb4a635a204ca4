"""The task API over gRPC (containerd 2.x with a ``{"version":3,"protocol":"grpc"}`` bootstrap).

A thin transport: the same ``TaskAPI`` table and the same interceptor as ttrpc, served with grpcio's
generic handlers; a ``ShimError`` becomes the gRPC status of the same code (``shim.errors`` table).
Imported only by a daemon that serves gRPC (grpcio is heavy; ``start`` never imports it).
"""

from __future__ import annotations

import os
from typing import Any

import grpc
from grpc import aio

from shim.api.interceptors import task_interceptor
from shim.api.task_api import TASK_SERVICES, Rpc, TaskAPI
from shim.errors import ShimError, to_status
from shim.ttrpc import CallContext

_GRPC_CODE = {sc.value[0]: sc for sc in grpc.StatusCode}


def _method_handler(service: str, name: str, rpc: Rpc) -> grpc.RpcMethodHandler:
    async def behavior(request: Any, context: aio.ServicerContext) -> Any:
        md: dict[str, list[str]] = {}
        for key, value in context.invocation_metadata() or ():
            md.setdefault(key.lower(), []).append(value if isinstance(value, str) else value.decode())
        ctx = CallContext(service=service, method=name, metadata=md, timeout=context.time_remaining())

        async def call_next() -> Any:
            return await rpc.handler(request, ctx)

        try:
            return await task_interceptor(ctx, request, call_next)
        except ShimError as exc:
            code, message = to_status(exc)
            await context.abort(_GRPC_CODE.get(int(code), grpc.StatusCode.UNKNOWN), message)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=rpc.request_type.FromString,
        response_serializer=lambda msg: msg.SerializeToString(),
    )


async def serve_grpc(api: TaskAPI, path: str) -> aio.Server:
    """Start a gRPC server for ``api`` on the unix socket ``path`` (mode 0600); returns it running.

    :raises OSError: the socket cannot be bound.
    """
    server = aio.server()
    table = api.table()
    for service in TASK_SERVICES:
        handlers = {name: _method_handler(service, name, rpc) for name, rpc in table.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise OSError(f"gRPC cannot bind unix socket {path}")
    await server.start()
    os.chmod(path, 0o600)
    return server


__all__ = ["serve_grpc"]
