"""The gRPC adapter gives the same answers and codes as the ttrpc edge for the same calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from shim._pb.containerd.task.v2 import shim_pb2
from shim.api.grpc_server import serve_grpc
from shim.errors import ShimError, code_of

from .conftest import Stack

E = empty_pb2.Empty


async def _grpc(channel: grpc.aio.Channel, method: str, req: Any, resp: Any) -> tuple[int, Any]:
    fn = channel.unary_unary(
        f"/containerd.task.v3.Task/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=resp.FromString,
    )
    try:
        return 0, await fn(req, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code().value[0], exc.details()


async def _ttrpc(stack: Stack, method: str, req: Any, resp: Any) -> tuple[int, Any]:
    try:
        return 0, await stack.client.call("containerd.task.v2.Task", method, req, resp, timeout=5)
    except ShimError as exc:
        return int(code_of(exc)), str(exc)


async def test_same_calls_same_answers_over_grpc_and_ttrpc(stack: Stack) -> None:
    path = str(stack.tmp / "grpc.sock")
    server = await serve_grpc(stack.api, path)
    channel = grpc.aio.insecure_channel(f"unix:{path}")
    try:
        script: list[tuple[str, Any, Any]] = [
            ("State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse),
            (
                "Create",
                shim_pb2.CreateTaskRequest(id="bad/id", bundle=stack.bundle),
                shim_pb2.CreateTaskResponse,
            ),
            ("Checkpoint", shim_pb2.CheckpointTaskRequest(id="nope"), E),
        ]
        for method, req, resp in script:
            assert await _grpc(channel, method, req, resp) == await _ttrpc(stack, method, req, resp), method

        # The same lifecycle, one task per transport; answers must match field by field.
        for transport, cid in (("grpc", "g1"), ("ttrpc", "t1")):
            do = (
                (lambda m, r, t: _grpc(channel, m, r, t))
                if transport == "grpc"
                else (lambda m, r, t: _ttrpc(stack, m, r, t))
            )
            code, created = await do(
                "Create", shim_pb2.CreateTaskRequest(id=cid, bundle=stack.bundle), shim_pb2.CreateTaskResponse
            )
            assert code == 0 and created.pid == 4242
            code, _ = await do(
                "Create", shim_pb2.CreateTaskRequest(id=cid, bundle=stack.bundle), shim_pb2.CreateTaskResponse
            )
            assert code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            code, _ = await do("Pause", shim_pb2.PauseRequest(id=cid), E)
            assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            await do("Start", shim_pb2.StartRequest(id=cid), shim_pb2.StartResponse)
            waiter = asyncio.create_task(do("Wait", shim_pb2.WaitRequest(id=cid), shim_pb2.WaitResponse))
            await asyncio.sleep(0.05)
            stack.backend.exit(cid, "", 5)
            code, waited = await asyncio.wait_for(waiter, 3)
            assert code == 0 and waited.exit_status == 5
            code, st = await do("State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse)
            assert (st.id, st.status, st.exit_status) == (cid, 3, 5)
            code, deleted = await do("Delete", shim_pb2.DeleteRequest(id=cid), shim_pb2.DeleteResponse)
            assert code == 0 and deleted.exit_status == 5
    finally:
        await channel.close()
        await server.stop(grace=None)


@pytest.mark.parametrize("service", ["containerd.task.v2.Task", "containerd.task.v3.Task"])
async def test_grpc_serves_both_service_names(stack: Stack, service: str) -> None:
    path = str(stack.tmp / "grpc2.sock")
    server = await serve_grpc(stack.api, path)
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            fn = channel.unary_unary(
                f"/{service}/Connect",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=shim_pb2.ConnectResponse.FromString,
            )
            resp = await fn(shim_pb2.ConnectRequest(id="x"), timeout=5)
            assert resp.shim_pid == 7
        import os
        import stat

        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        await server.stop(grace=None)
