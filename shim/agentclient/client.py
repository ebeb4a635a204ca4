"""Typed async client of the pyvm guest agent (``pyvm.agent.v1``) over one ttrpc connection.

The guest is untrusted: every answer is checked (sizes, ranges, ids) and turned into a frozen
dataclass; anything out of bounds raises ``shim.errors.GuestError``. Every call that is not a long
poll has a deadline from ``TIMEOUTS`` (seconds on a fast machine) times ``timeout_factor``
(TCG is 10-50x slower than KVM: give a factor from the accelerator probe). Long polls —
WaitProcess, ReadStdout/ReadStderr, GetOOMEvent — have none: cancel the awaiting task instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
from shim.agentclient.types import (
    AgentVersion,
    ContainerStats,
    CpuStats,
    ExitStatus,
    GuestDetails,
    GuestInterface,
    GuestRoute,
    MemInfo,
    MemoryOnlined,
    MemoryStats,
    Output,
    PidsStats,
    ProcessInfo,
    Stdio,
    TemplatePrepared,
)
from shim.errors import GuestError, InvalidArgument
from shim.ids import validate_id
from shim.ttrpc import MAX_MESSAGE_SIZE, Client

M = TypeVar("M", bound=Message)

HEALTH = "pyvm.agent.v1.Health"
AGENT = "pyvm.agent.v1.AgentService"
PROTOCOL_VERSION = 1

#: base deadline per RPC in seconds; ``None``: a long poll without deadline
TIMEOUTS: Mapping[str, float | None] = {
    "Check": 5,
    "Version": 15,
    "GuestDetails": 5,
    "GetMemInfo": 5,
    "OnlineMemory": 15,  # plus the requested wait
    "PrepareTemplate": 60,
    "CreateSandbox": 15,  # plus SHARE_WAIT when it mounts a share
    "DestroySandbox": 60,
    "CreateContainer": 60,
    "StartContainer": 30,
    "RemoveContainer": 60,
    "PauseContainer": 15,
    "ResumeContainer": 15,
    "UpdateContainer": 15,
    "StatsContainer": 5,
    "ListProcesses": 5,
    "ExecProcess": 60,
    "SignalProcess": 10,
    "WaitProcess": None,
    "ReadStdout": None,
    "ReadStderr": None,
    "WriteStdin": 120,  # blocks while the process does not read its stdin
    "CloseStdin": 120,
    "TtyWinResize": 5,
    "GetOOMEvent": None,
}

#: the biggest chunk one WriteStdin / ReadStdout carries (well under the 4 MiB ttrpc limit)
MAX_IO_CHUNK = 1024 * 1024
#: the biggest OCI spec / process / resources JSON we send
MAX_JSON = MAX_MESSAGE_SIZE - 64 * 1024
#: how long the agent waits for a virtio-fs tag it does not know yet (hot-plugged right before)
SHARE_WAIT = 20.0
#: entropy sent with every CreateSandbox, and the most the agent accepts
SANDBOX_ENTROPY = 64
MAX_ENTROPY = 512
_MAX_PID = 1 << 22
_MAX_TEXT = 4096


class AgentClient:
    """One agent connection. Methods may run concurrently (ttrpc multiplexes them)."""

    def __init__(self, ttrpc: Client, *, timeout_factor: float = 1.0) -> None:
        if timeout_factor <= 0:
            raise InvalidArgument(f"timeout_factor must be positive, not {timeout_factor}")
        self.ttrpc = ttrpc
        self.timeout_factor = timeout_factor

    @property
    def closed(self) -> bool:
        return self.ttrpc.closed

    async def close(self) -> None:
        await self.ttrpc.close()

    def timeout(self, method: str, extra: float = 0.0) -> float | None:
        base = TIMEOUTS[method]
        return None if base is None else base * self.timeout_factor + extra

    async def _call(
        self, service: str, method: str, req: Message, resp_type: type[M], *, extra: float = 0.0
    ) -> M:
        return await self.ttrpc.call(service, method, req, resp_type, timeout=self.timeout(method, extra))

    async def _agent(self, method: str, req: Message, resp_type: type[M], *, extra: float = 0.0) -> M:
        return await self._call(AGENT, method, req, resp_type, extra=extra)

    # -- health -------------------------------------------------------------------------------------

    async def check(self, *, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """True if the agent says it is serving. ``timeout`` overrides the table (for wait_ready)."""
        t = timeout if timeout is not None else self.timeout("Check")
        resp = await self.ttrpc.call(HEALTH, "Check", pb.CheckRequest(), pb.CheckResponse, timeout=t)
        return resp.status == pb.CheckResponse.SERVING

    async def version(self) -> AgentVersion:
        r = await self._call(HEALTH, "Version", pb.VersionRequest(), pb.VersionResponse)
        return AgentVersion(
            _text(r.agent_version), r.protocol_version, _text(r.python_version), _text(r.crun_version)
        )

    # -- guest --------------------------------------------------------------------------------------

    async def guest_details(self) -> GuestDetails:
        r = await self._agent("GuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)
        bs = r.memory_block_size_bytes
        if bs and (bs & (bs - 1) or bs < 4096):
            raise GuestError(f"agent reported a bad memory block size {bs}")
        if r.cgroup_version not in (0, 1, 2):
            raise GuestError(f"agent reported cgroup version {r.cgroup_version}")
        return GuestDetails(
            memory_block_size=bs,
            kernel_release=_text(r.kernel_release),
            cgroup_version=r.cgroup_version,
            boot_id=_text(r.boot_id),
            mem_total=r.mem_total_bytes,
            arch=_text(r.arch),
            online_cpus=r.online_cpus,
            memory_hotplug=r.memory_hotplug,
        )

    async def mem_info(self) -> MemInfo:
        r = await self._agent("GetMemInfo", pb.GetMemInfoRequest(), pb.GetMemInfoResponse)
        return MemInfo(
            r.mem_total_bytes,
            r.mem_free_bytes,
            r.mem_available_bytes,
            r.cached_bytes,
            r.swap_total_bytes,
            r.swap_free_bytes,
        )

    async def online_memory(
        self, *, movable: bool = True, wait_for_bytes: int = 0, wait_s: float = 0.0
    ) -> MemoryOnlined:
        """Online every offline memory block (``online_movable`` unless ``movable=False``), polling
        up to ``wait_s`` for at least ``wait_for_bytes`` to appear (hot-added DIMMs show up late).
        """
        wait_ms = max(0, min(int(wait_s * 1000), 600_000))
        r = await self._agent(
            "OnlineMemory",
            pb.OnlineMemoryRequest(movable=movable, wait_for_bytes=wait_for_bytes, wait_ms=wait_ms),
            pb.OnlineMemoryResponse,
            extra=wait_ms / 1000,
        )
        if len(r.failures) > 65536:
            raise GuestError("agent reported too many memory block failures")
        return MemoryOnlined(
            r.blocks_onlined, r.bytes_onlined, tuple(_text(f) for f in r.failures), r.mem_total_bytes
        )

    async def prepare_template(self, *, drop_caches: bool = False) -> TemplatePrepared:
        """Settle a template VM right before the host saves it: every module loaded, filesystems
        synced (the page cache dropped only with ``drop_caches``: a warm cache is what lets a restored
        guest answer at once). Call it before ``create_sandbox`` (the agent refuses it once a share
        is mounted). Module failures are reported in the answer, not raised.
        """
        r = await self._agent(
            "PrepareTemplate", pb.PrepareTemplateRequest(drop_caches=drop_caches), pb.PrepareTemplateResponse
        )
        if len(r.failures) > 4096 or r.modules_loaded > r.modules_listed:
            raise GuestError(
                f"agent reported {r.modules_loaded} of {r.modules_listed} modules loaded "
                f"and {len(r.failures)} failures"
            )
        return TemplatePrepared(
            r.modules_listed, r.modules_loaded, tuple(_text(f) for f in r.failures), r.caches_dropped
        )

    # -- sandbox ------------------------------------------------------------------------------------

    async def create_sandbox(
        self,
        *,
        sandbox_id: str = "",
        hostname: str = "",
        share_tag: str = "",
        share_mount_point: str = "",
        host_time: datetime | None = None,
        entropy: bytes | None = None,
        interfaces: Sequence[GuestInterface] = (),
        routes: Sequence[GuestRoute] = (),
    ) -> None:
        """Prepare the guest for the pod: its wall clock set to ``host_time`` (default: now), its
        kernel RNG seeded with ``entropy`` (default: ``SANDBOX_ENTROPY`` bytes of ``os.urandom``;
        at most ``MAX_ENTROPY``), the hostname set, the share mounted and the pod's ``interfaces``
        and ``routes`` applied to the NICs with their MACs. A VM restored from a template needs the
        first two; the agent waits up to ``SHARE_WAIT`` for a hot-plugged share or NIC.
        """
        if entropy is None:
            entropy = os.urandom(SANDBOX_ENTROPY)
        if len(entropy) > MAX_ENTROPY:
            raise InvalidArgument(f"entropy is {len(entropy)} bytes; at most {MAX_ENTROPY}")
        if host_time is None:
            host_time = datetime.now(UTC)
        elif host_time.tzinfo is None:
            raise InvalidArgument("host_time must be timezone-aware")
        req = pb.CreateSandboxRequest(
            sandbox_id=sandbox_id,
            hostname=hostname,
            share_tag=share_tag,
            share_mount_point=share_mount_point,
            entropy=entropy,
            interfaces=[
                pb.Interface(
                    name=i.name,
                    mac=i.mac,
                    mtu=i.mtu,
                    addresses=[_ip_address(a) for a in i.addresses],
                )
                for i in interfaces
            ],
            routes=[
                pb.Route(
                    destination=r.destination,
                    gateway=r.gateway,
                    device=r.device,
                    source=r.source,
                    scope=r.scope,
                    family=r.family,
                )
                for r in routes
            ],
        )
        req.host_time.FromDatetime(host_time)
        # the agent waits up to SHARE_WAIT for a hot-plugged share, and as long for a hot-plugged NIC
        waits = bool(share_tag) + bool(interfaces)
        await self._agent("CreateSandbox", req, empty_pb2.Empty, extra=SHARE_WAIT * waits)

    async def destroy_sandbox(self) -> None:
        await self._agent("DestroySandbox", pb.DestroySandboxRequest(), empty_pb2.Empty)

    # -- containers ---------------------------------------------------------------------------------

    async def create_container(self, container_id: str, spec: Mapping[str, Any] | bytes, stdio: Stdio) -> int:
        """``crun create`` in the guest; ``spec`` paths must already point into the share. Returns
        the guest pid of the init.
        """
        validate_id(container_id, kind="container id")
        r = await self._agent(
            "CreateContainer",
            pb.CreateContainerRequest(
                container_id=container_id, oci_spec_json=_json(spec, "OCI spec"), stdio=_stdio(stdio)
            ),
            pb.CreateContainerResponse,
        )
        return _pid(r.pid)

    async def start_container(self, container_id: str) -> int:
        r = await self._agent(
            "StartContainer", pb.StartContainerRequest(container_id=container_id), pb.StartContainerResponse
        )
        return _pid(r.pid)

    async def remove_container(self, container_id: str) -> None:
        await self._agent(
            "RemoveContainer", pb.RemoveContainerRequest(container_id=container_id), empty_pb2.Empty
        )

    async def pause_container(self, container_id: str) -> None:
        await self._agent(
            "PauseContainer", pb.PauseContainerRequest(container_id=container_id), empty_pb2.Empty
        )

    async def resume_container(self, container_id: str) -> None:
        await self._agent(
            "ResumeContainer", pb.ResumeContainerRequest(container_id=container_id), empty_pb2.Empty
        )

    async def update_container(self, container_id: str, resources: Mapping[str, Any] | bytes) -> None:
        """Apply an OCI ``LinuxResources`` object to the container's cgroup."""
        await self._agent(
            "UpdateContainer",
            pb.UpdateContainerRequest(
                container_id=container_id, resources_json=_json(resources, "resources")
            ),
            empty_pb2.Empty,
        )

    async def stats_container(self, container_id: str) -> ContainerStats:
        r = await self._agent(
            "StatsContainer", pb.StatsContainerRequest(container_id=container_id), pb.StatsContainerResponse
        )
        c, m, p = r.cpu, r.memory, r.pids
        return ContainerStats(
            cgroup_version=r.cgroup_version,
            cpu=CpuStats(
                c.usage_usec, c.user_usec, c.system_usec, c.nr_periods, c.nr_throttled, c.throttled_usec
            ),
            memory=MemoryStats(
                usage=m.usage,
                limit=m.limit,
                max_usage=m.max_usage,
                anon=m.anon,
                file=m.file,
                inactive_file=m.inactive_file,
                active_file=m.active_file,
                pgfault=m.pgfault,
                pgmajfault=m.pgmajfault,
                swap_usage=m.swap_usage,
                swap_limit=m.swap_limit,
                oom_kill=m.oom_kill,
            ),
            pids=PidsStats(p.current, p.limit),
        )

    async def list_processes(self, container_id: str) -> list[ProcessInfo]:
        r = await self._agent(
            "ListProcesses", pb.ListProcessesRequest(container_id=container_id), pb.ListProcessesResponse
        )
        return [ProcessInfo(_pid(p.pid), _opt_id(p.exec_id), p.is_init) for p in r.processes]

    # -- processes ----------------------------------------------------------------------------------

    async def exec_process(
        self, container_id: str, exec_id: str, process: Mapping[str, Any] | bytes, stdio: Stdio
    ) -> int:
        """Start an OCI ``Process`` in the running container; returns its guest pid."""
        validate_id(exec_id, kind="exec id")
        r = await self._agent(
            "ExecProcess",
            pb.ExecProcessRequest(
                container_id=container_id,
                exec_id=exec_id,
                process_json=_json(process, "OCI process"),
                stdio=_stdio(stdio),
            ),
            pb.ExecProcessResponse,
        )
        return _pid(r.pid)

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, *, all: bool = False
    ) -> None:
        await self._agent(
            "SignalProcess",
            pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=signal, all=all),
            empty_pb2.Empty,
        )

    async def wait_process(self, container_id: str, exec_id: str = "") -> ExitStatus:
        """Long poll: the exit, reported after the process's stdout/stderr reached EOF (or a short
        grace period passed); unread output stays readable.
        """
        r = await self._agent(
            "WaitProcess",
            pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id),
            pb.WaitProcessResponse,
        )
        if r.exit_status > 255:
            raise GuestError(f"agent reported exit status {r.exit_status}")
        return ExitStatus(r.exit_status, r.exited_at.ToDatetime(tzinfo=UTC), r.oom_killed)

    async def read_stdout(self, container_id: str, exec_id: str = "", max_bytes: int = 64 * 1024) -> Output:
        return await self._read("ReadStdout", container_id, exec_id, max_bytes)

    async def read_stderr(self, container_id: str, exec_id: str = "", max_bytes: int = 64 * 1024) -> Output:
        return await self._read("ReadStderr", container_id, exec_id, max_bytes)

    async def _read(self, method: str, container_id: str, exec_id: str, max_bytes: int) -> Output:
        n = max(1, min(max_bytes, MAX_IO_CHUNK))
        r = await self._agent(
            method,
            pb.ReadOutputRequest(container_id=container_id, exec_id=exec_id, max_bytes=n),
            pb.ReadOutputResponse,
        )
        if len(r.data) > n:
            raise GuestError(f"agent returned {len(r.data)} bytes for a {n}-byte {method}")
        if r.eof and r.data:
            raise GuestError(f"agent returned data together with eof in {method}")
        if not r.eof and not r.data:
            raise GuestError(f"agent returned neither data nor eof in {method}")
        return Output(r.data, r.eof)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """Write all of ``data`` (in chunks of at most ``MAX_IO_CHUNK``); returns bytes written."""
        total = 0
        view = memoryview(data)
        while total < len(view):
            chunk = bytes(view[total : total + MAX_IO_CHUNK])
            r = await self._agent(
                "WriteStdin",
                pb.WriteStdinRequest(container_id=container_id, exec_id=exec_id, data=chunk),
                pb.WriteStdinResponse,
            )
            if r.written > len(chunk):
                raise GuestError(f"agent claims {r.written} bytes written of {len(chunk)}")
            total += r.written
            if r.written < len(chunk):
                break
        return total

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._agent(
            "CloseStdin", pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id), empty_pb2.Empty
        )

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        if not (0 <= rows <= 0xFFFF and 0 <= columns <= 0xFFFF):
            raise InvalidArgument(f"terminal size {rows}x{columns} is out of range")
        await self._agent(
            "TtyWinResize",
            pb.TtyWinResizeRequest(container_id=container_id, exec_id=exec_id, rows=rows, columns=columns),
            empty_pb2.Empty,
        )

    async def get_oom_event(self) -> str:
        """Long poll: the id of the next container whose cgroup saw an OOM kill."""
        r = await self._agent("GetOOMEvent", pb.GetOOMEventRequest(), pb.GetOOMEventResponse)
        try:
            return validate_id(r.container_id, kind="container id")
        except InvalidArgument as exc:
            raise GuestError(f"agent sent a bad OOM event: {exc}") from exc


def _stdio(s: Stdio) -> pb.Stdio:
    return pb.Stdio(stdin=s.stdin, stdout=s.stdout, stderr=s.stderr)


def _json(value: Mapping[str, Any] | bytes, what: str) -> bytes:
    data = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    if len(data) > MAX_JSON:
        raise InvalidArgument(f"{what} is {len(data)} bytes; at most {MAX_JSON} fit in one agent call")
    return data


def _pid(pid: int) -> int:
    if not 0 < pid < _MAX_PID:
        raise GuestError(f"agent reported pid {pid}")
    return pid


def _text(s: str) -> str:
    if len(s) > _MAX_TEXT:
        raise GuestError(f"agent sent a {len(s)}-character string")
    return s


def _opt_id(s: str) -> str:
    if not s:
        return s
    try:
        return validate_id(s)
    except InvalidArgument as exc:
        raise GuestError(f"agent sent a bad id: {exc}") from exc


def _ip_address(cidr: str) -> pb.IPAddress:
    """ "10.88.0.5/16" -> IPAddress; the guest validates the parts."""
    address, _, prefix = cidr.partition("/")
    if not prefix.isdigit():
        raise InvalidArgument(f"address {cidr!r} is not ADDRESS/PREFIX_LEN", value=cidr)
    return pb.IPAddress(address=address, prefix_len=int(prefix))
