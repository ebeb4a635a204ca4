"""The containerd task API (``containerd.task.v2.Task`` = ``containerd.task.v3.Task``): one handler table.

Each handler decodes (``translate``), calls one ``TaskService`` method, encodes. Handlers do not know
their transport: ``register_ttrpc`` serves the table over ttrpc, ``shim/api/grpc_server.py`` over
gRPC; both wrap every call in ``interceptors.task_interceptor``. v2 and v3 are field-for-field
identical, so the v2 message classes decode both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from shim._pb.containerd.task.v2 import shim_pb2
from shim.api import translate as tr
from shim.api.interceptors import task_interceptor
from shim.service.task_service import TaskService
from shim.ttrpc import Method, Server

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")

Handler = Callable[[Any, Any], Awaitable[Message]]


@dataclass(frozen=True)
class Rpc:
    request_type: type[Message]
    response_type: type[Message]
    handler: Handler


_EMPTY = empty_pb2.Empty


class TaskAPI:
    """Binds the handler table to one ``TaskService``."""

    def __init__(self, service: TaskService) -> None:
        self.service = service

    async def state(self, req: shim_pb2.StateRequest, ctx: Any) -> shim_pb2.StateResponse:
        return tr.state_response(self.service.state(tr.container_id(req.id), tr.exec_id(req.exec_id)))

    async def create(self, req: shim_pb2.CreateTaskRequest, ctx: Any) -> shim_pb2.CreateTaskResponse:
        pid = await self.service.create(tr.create_request(req))
        return shim_pb2.CreateTaskResponse(pid=pid)

    async def start(self, req: shim_pb2.StartRequest, ctx: Any) -> shim_pb2.StartResponse:
        pid = await self.service.start(tr.container_id(req.id), tr.exec_id(req.exec_id))
        return shim_pb2.StartResponse(pid=pid)

    async def delete(self, req: shim_pb2.DeleteRequest, ctx: Any) -> shim_pb2.DeleteResponse:
        return tr.delete_response(await self.service.delete(tr.container_id(req.id), tr.exec_id(req.exec_id)))

    async def pids(self, req: shim_pb2.PidsRequest, ctx: Any) -> shim_pb2.PidsResponse:
        return tr.pids_response(await self.service.pids(tr.container_id(req.id)))

    async def pause(self, req: shim_pb2.PauseRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.pause(tr.container_id(req.id))
        return _EMPTY()

    async def resume(self, req: shim_pb2.ResumeRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.resume(tr.container_id(req.id))
        return _EMPTY()

    async def checkpoint(self, req: shim_pb2.CheckpointTaskRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.checkpoint(tr.container_id(req.id))
        return _EMPTY()

    async def kill(self, req: shim_pb2.KillRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.kill(tr.container_id(req.id), tr.exec_id(req.exec_id), req.signal, req.all)
        return _EMPTY()

    async def exec(self, req: shim_pb2.ExecProcessRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.exec(tr.exec_request(req))
        return _EMPTY()

    async def resize_pty(self, req: shim_pb2.ResizePtyRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.resize_pty(tr.container_id(req.id), tr.exec_id(req.exec_id), req.width, req.height)
        return _EMPTY()

    async def close_io(self, req: shim_pb2.CloseIORequest, ctx: Any) -> empty_pb2.Empty:
        if req.stdin:
            await self.service.close_io(tr.container_id(req.id), tr.exec_id(req.exec_id))
        return _EMPTY()

    async def update(self, req: shim_pb2.UpdateTaskRequest, ctx: Any) -> empty_pb2.Empty:
        await self.service.update(tr.container_id(req.id), tr.resources(req))
        return _EMPTY()

    async def wait(self, req: shim_pb2.WaitRequest, ctx: Any) -> shim_pb2.WaitResponse:
        return tr.wait_response(await self.service.wait(tr.container_id(req.id), tr.exec_id(req.exec_id)))

    async def stats(self, req: shim_pb2.StatsRequest, ctx: Any) -> shim_pb2.StatsResponse:
        return tr.stats_response(await self.service.stats(tr.container_id(req.id)))

    async def connect(self, req: shim_pb2.ConnectRequest, ctx: Any) -> shim_pb2.ConnectResponse:
        return tr.connect_response(self.service.connect(req.id))

    async def shutdown(self, req: shim_pb2.ShutdownRequest, ctx: Any) -> empty_pb2.Empty:
        # Answer first: the daemon exits after this response went out (service.shutdown_requested).
        self.service.shutdown()
        return _EMPTY()

    def table(self) -> dict[str, Rpc]:
        """RPC name -> (request type, response type, handler)."""
        s = shim_pb2
        return {
            "State": Rpc(s.StateRequest, s.StateResponse, self.state),
            "Create": Rpc(s.CreateTaskRequest, s.CreateTaskResponse, self.create),
            "Start": Rpc(s.StartRequest, s.StartResponse, self.start),
            "Delete": Rpc(s.DeleteRequest, s.DeleteResponse, self.delete),
            "Pids": Rpc(s.PidsRequest, s.PidsResponse, self.pids),
            "Pause": Rpc(s.PauseRequest, _EMPTY, self.pause),
            "Resume": Rpc(s.ResumeRequest, _EMPTY, self.resume),
            "Checkpoint": Rpc(s.CheckpointTaskRequest, _EMPTY, self.checkpoint),
            "Kill": Rpc(s.KillRequest, _EMPTY, self.kill),
            "Exec": Rpc(s.ExecProcessRequest, _EMPTY, self.exec),
            "ResizePty": Rpc(s.ResizePtyRequest, _EMPTY, self.resize_pty),
            "CloseIO": Rpc(s.CloseIORequest, _EMPTY, self.close_io),
            "Update": Rpc(s.UpdateTaskRequest, _EMPTY, self.update),
            "Wait": Rpc(s.WaitRequest, s.WaitResponse, self.wait),
            "Stats": Rpc(s.StatsRequest, s.StatsResponse, self.stats),
            "Connect": Rpc(s.ConnectRequest, s.ConnectResponse, self.connect),
            "Shutdown": Rpc(s.ShutdownRequest, _EMPTY, self.shutdown),
        }


#: Served as eager ttrpc Methods (no task, no timer when they do not suspend): polled constantly,
#: and synchronous all the way down (interceptor quiet path, ``TaskService.state``, translate).
EAGER_METHODS = frozenset({"State"})


def ttrpc_server(api: TaskAPI) -> Server:
    """A ttrpc ``Server`` serving ``api`` under both task service names, with the interceptor."""
    server = Server(interceptor=task_interceptor)
    methods = {
        name: Method(r.request_type, r.response_type, r.handler, eager=name in EAGER_METHODS)
        for name, r in api.table().items()
    }
    for service in TASK_SERVICES:
        server.register(service, methods)
    return server


__all__ = ["TASK_SERVICES", "Rpc", "TaskAPI", "ttrpc_server"]
