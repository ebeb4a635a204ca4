"""ttrpc handlers: decode the request, call ``Agent``, encode the answer. Nothing else lives here.

Errors are ``shim.errors`` classes raised by ``Agent``; the ttrpc server maps them to statuses. The
interceptor logs every failed call once, with its duration.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
from shim.errors import ShimError
from shim.guestagent import guest
from shim.guestagent.agent import Agent, StdioRequest
from shim.log import get_logger
from shim.ttrpc import CallContext, Method, Server

log = get_logger(__name__)

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = 1
HEALTH_SERVICE = "pyvm.agent.v1.Health"
AGENT_SERVICE = "pyvm.agent.v1.AgentService"
_EMPTY = empty_pb2.Empty()


async def _interceptor(
    ctx: CallContext, request: Message, call_next: Callable[[], Awaitable[Message]]
) -> Message:
    start = time.monotonic()
    try:
        return await call_next()
    except ShimError as exc:
        log.info(
            "rpc failed",
            method=ctx.method,
            error=str(exc),
            kind=type(exc).__name__,
            ms=round((time.monotonic() - start) * 1000, 1),
        )
        raise
    except Exception:
        log.exception("rpc crashed", method=ctx.method)
        raise


def _stdio(s: pb.Stdio, has_field: bool) -> StdioRequest:
    # an absent Stdio means the common case: output read, no stdin
    return StdioRequest(stdin=s.stdin, stdout=s.stdout, stderr=s.stderr) if has_field else StdioRequest()


class AgentService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    # Health
    async def check(self, req: pb.CheckRequest, ctx: CallContext) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    async def version(self, req: pb.VersionRequest, ctx: CallContext) -> pb.VersionResponse:
        return pb.VersionResponse(
            agent_version=AGENT_VERSION,
            protocol_version=PROTOCOL_VERSION,
            python_version=sys.version.split()[0],
            crun_version=await self.agent.crun_version(),
        )

    # guest
    async def guest_details(self, req: pb.GuestDetailsRequest, ctx: CallContext) -> pb.GuestDetailsResponse:
        d = guest.details()
        return pb.GuestDetailsResponse(
            memory_block_size_bytes=d.memory_block_size,
            kernel_release=d.kernel_release,
            cgroup_version=d.cgroup_version,
            boot_id=d.boot_id,
            mem_total_bytes=d.mem_total,
            arch=d.arch,
            online_cpus=d.online_cpus,
            memory_hotplug=d.memory_hotplug,
        )

    async def get_mem_info(self, req: pb.GetMemInfoRequest, ctx: CallContext) -> pb.GetMemInfoResponse:
        m = guest.meminfo()
        return pb.GetMemInfoResponse(
            mem_total_bytes=m.get("MemTotal", 0),
            mem_free_bytes=m.get("MemFree", 0),
            mem_available_bytes=m.get("MemAvailable", 0),
            cached_bytes=m.get("Cached", 0),
            swap_total_bytes=m.get("SwapTotal", 0),
            swap_free_bytes=m.get("SwapFree", 0),
        )

    async def online_memory(self, req: pb.OnlineMemoryRequest, ctx: CallContext) -> pb.OnlineMemoryResponse:
        await self.agent.ensure_modules()  # virtio_mem
        r = await guest.online_memory(req.movable, req.wait_for_bytes, min(req.wait_ms, 600_000))
        return pb.OnlineMemoryResponse(
            blocks_onlined=len(r.blocks),
            bytes_onlined=r.bytes_onlined,
            failures=r.failures,
            mem_total_bytes=r.mem_total,
        )

    async def prepare_template(
        self, req: pb.PrepareTemplateRequest, ctx: CallContext
    ) -> pb.PrepareTemplateResponse:
        r = await self.agent.prepare_template(drop_caches=req.drop_caches)
        return pb.PrepareTemplateResponse(
            modules_listed=r.modules_listed,
            modules_loaded=r.modules_loaded,
            failures=r.failures,
            caches_dropped=r.caches_dropped,
        )

    # sandbox
    async def create_sandbox(self, req: pb.CreateSandboxRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.create_sandbox(
            req.hostname,
            req.share_tag,
            req.share_mount_point,
            host_time_ns=req.host_time.ToNanoseconds() if req.HasField("host_time") else None,
            entropy=req.entropy,
            interfaces=req.interfaces,
            routes=req.routes,
        )
        return _EMPTY

    async def destroy_sandbox(self, req: pb.DestroySandboxRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.destroy_sandbox()
        return _EMPTY

    # containers
    async def create_container(
        self, req: pb.CreateContainerRequest, ctx: CallContext
    ) -> pb.CreateContainerResponse:
        pid = await self.agent.create_container(
            req.container_id, req.oci_spec_json, _stdio(req.stdio, req.HasField("stdio"))
        )
        return pb.CreateContainerResponse(pid=pid)

    async def start_container(
        self, req: pb.StartContainerRequest, ctx: CallContext
    ) -> pb.StartContainerResponse:
        return pb.StartContainerResponse(pid=await self.agent.start_container(req.container_id))

    async def remove_container(self, req: pb.RemoveContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.remove_container(req.container_id)
        return _EMPTY

    async def pause_container(self, req: pb.PauseContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.pause(req.container_id)
        return _EMPTY

    async def resume_container(self, req: pb.ResumeContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.resume(req.container_id)
        return _EMPTY

    async def update_container(self, req: pb.UpdateContainerRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.update(req.container_id, req.resources_json)
        return _EMPTY

    async def stats_container(
        self, req: pb.StatsContainerRequest, ctx: CallContext
    ) -> pb.StatsContainerResponse:
        st = self.agent.stats(req.container_id)
        return pb.StatsContainerResponse(
            cpu=pb.CpuStats(**st.cpu),
            memory=pb.MemoryStats(**st.memory),
            pids=pb.PidsStats(**st.pids),
            cgroup_version=st.cgroup_version,
        )

    async def list_processes(
        self, req: pb.ListProcessesRequest, ctx: CallContext
    ) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(
            processes=[
                pb.ProcessInfo(pid=pid, exec_id=eid, is_init=init)
                for pid, eid, init in self.agent.list_processes(req.container_id)
            ]
        )

    # processes
    async def exec_process(self, req: pb.ExecProcessRequest, ctx: CallContext) -> pb.ExecProcessResponse:
        pid = await self.agent.exec_process(
            req.container_id, req.exec_id, req.process_json, _stdio(req.stdio, req.HasField("stdio"))
        )
        return pb.ExecProcessResponse(pid=pid)

    async def signal_process(self, req: pb.SignalProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.signal(req.container_id, req.exec_id, req.signal, req.all)
        return _EMPTY

    async def wait_process(self, req: pb.WaitProcessRequest, ctx: CallContext) -> pb.WaitProcessResponse:
        r = await self.agent.wait(req.container_id, req.exec_id)
        resp = pb.WaitProcessResponse(exit_status=r.exit_status, oom_killed=r.oom_killed)
        resp.exited_at.FromNanoseconds(int(r.exited_at * 1e9))
        return resp

    async def read_stdout(self, req: pb.ReadOutputRequest, ctx: CallContext) -> pb.ReadOutputResponse:
        data, eof = await self.agent.read_output(req.container_id, req.exec_id, "stdout", req.max_bytes)
        return pb.ReadOutputResponse(data=data, eof=eof)

    async def read_stderr(self, req: pb.ReadOutputRequest, ctx: CallContext) -> pb.ReadOutputResponse:
        data, eof = await self.agent.read_output(req.container_id, req.exec_id, "stderr", req.max_bytes)
        return pb.ReadOutputResponse(data=data, eof=eof)

    async def write_stdin(self, req: pb.WriteStdinRequest, ctx: CallContext) -> pb.WriteStdinResponse:
        return pb.WriteStdinResponse(
            written=await self.agent.write_stdin(req.container_id, req.exec_id, req.data)
        )

    async def close_stdin(self, req: pb.CloseStdinRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.agent.close_stdin(req.container_id, req.exec_id)
        return _EMPTY

    async def tty_win_resize(self, req: pb.TtyWinResizeRequest, ctx: CallContext) -> empty_pb2.Empty:
        self.agent.resize(req.container_id, req.exec_id, req.rows, req.columns)
        return _EMPTY

    async def get_oom_event(self, req: pb.GetOOMEventRequest, ctx: CallContext) -> pb.GetOOMEventResponse:
        return pb.GetOOMEventResponse(container_id=await self.agent.next_oom())

    def register(self, server: Server) -> None:
        def m(name: str, handler: Callable[[Any, CallContext], Awaitable[Any]]) -> Method:
            method = pb.DESCRIPTOR.services_by_name[svc].methods_by_name[name]
            return Method(_cls(method.input_type.full_name), _cls(method.output_type.full_name), handler)

        svc = "Health"
        server.register(
            HEALTH_SERVICE, {"Check": m("Check", self.check), "Version": m("Version", self.version)}
        )
        svc = "AgentService"
        handlers = {
            "GuestDetails": self.guest_details,
            "GetMemInfo": self.get_mem_info,
            "OnlineMemory": self.online_memory,
            "PrepareTemplate": self.prepare_template,
            "CreateSandbox": self.create_sandbox,
            "DestroySandbox": self.destroy_sandbox,
            "CreateContainer": self.create_container,
            "StartContainer": self.start_container,
            "RemoveContainer": self.remove_container,
            "PauseContainer": self.pause_container,
            "ResumeContainer": self.resume_container,
            "UpdateContainer": self.update_container,
            "StatsContainer": self.stats_container,
            "ListProcesses": self.list_processes,
            "ExecProcess": self.exec_process,
            "SignalProcess": self.signal_process,
            "WaitProcess": self.wait_process,
            "ReadStdout": self.read_stdout,
            "ReadStderr": self.read_stderr,
            "WriteStdin": self.write_stdin,
            "CloseStdin": self.close_stdin,
            "TtyWinResize": self.tty_win_resize,
            "GetOOMEvent": self.get_oom_event,
        }
        missing = set(pb.DESCRIPTOR.services_by_name[svc].methods_by_name) ^ set(handlers)
        assert not missing, f"AgentService handlers out of sync with agent.proto: {missing}"
        server.register(AGENT_SERVICE, {name: m(name, h) for name, h in handlers.items()})


def _cls(full_name: str) -> type[Message]:
    if full_name == "google.protobuf.Empty":
        return empty_pb2.Empty
    return getattr(pb, full_name.rsplit(".", 1)[1])  # type: ignore[no-any-return]


def build_server(agent: Agent) -> Server:
    server = Server(interceptor=_interceptor)
    AgentService(agent).register(server)
    return server
