"""containerd protobuf <-> domain dataclasses: the only module that knows both (wire types stop here).

Decoding validates ids (once, with ``shim.ids.validate_id``) and decodes the JSON carried in Anys
(exec Process spec, LinuxResources). Encoding never writes a zero timestamp: an unset ``exited_at``
is left out, which containerd decodes as Go's zero time, like runc's shim sends.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cache
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2

from shim._pb.containerd.cgroups.v1 import metrics_pb2 as cg1
from shim._pb.containerd.cgroups.v2 import metrics_pb2 as cg2
from shim._pb.containerd.events import task_pb2 as events_pb2
from shim._pb.containerd.runtimeoptions.v1 import options_pb2
from shim._pb.containerd.task.v2 import shim_pb2
from shim._pb.containerd.types import mount_pb2
from shim._pb.containerd.types.task import task_pb2
from shim.errors import InvalidArgument
from shim.ids import validate_id
from shim.sandbox.spec import (
    ContainerRequest,
    ContainerStats,
    ExecRequest,
    ExitStatus,
    Mount,
    ProcessInfo,
    ProcessStatus,
    Resources,
    Stdio,
)
from shim.service import events as ev
from shim.service.task_service import ConnectResult, DeleteResult

PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"

_STATUS = {
    "created": task_pb2.CREATED,
    "running": task_pb2.RUNNING,
    "paused": task_pb2.PAUSED,
    "stopped": task_pb2.STOPPED,
}

# --- decoding -------------------------------------------------------------------------------------


def container_id(value: str) -> str:
    return validate_id(value, kind="container id")


def exec_id(value: str) -> str:
    """``""`` (the init process) or a valid exec id."""
    return validate_id(value, kind="exec id") if value else ""


def _type_name(type_url: str) -> str:
    """The message name of an Any's URL, bare or ``type.googleapis.com/...`` (2.x sends either)."""
    return type_url.rsplit("/", 1)[-1] if "googleapis.com/" in type_url else type_url


def _json_any(value: any_pb2.Any, expected_url: str, what: str) -> dict[str, Any]:
    if not value.type_url and not value.value:
        return {}
    if value.type_url != expected_url:
        raise InvalidArgument(f"{what} has type {value.type_url!r}, expected {expected_url!r}")
    try:
        decoded = json.loads(value.value or b"{}")
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(decoded, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return decoded


def config_path(options: any_pb2.Any) -> str:
    """The ``ConfigPath`` of runtime options (``runtimeoptions.v1.Options``), or ``""``."""
    if not options.type_url or _type_name(options.type_url) != RUNTIME_OPTIONS:
        return ""
    try:
        return options_pb2.Options.FromString(options.value).config_path
    except Exception as exc:
        raise InvalidArgument(f"runtime options do not decode as {RUNTIME_OPTIONS}: {exc}") from exc


def _stdio(stdin: str, stdout: str, stderr: str, terminal: bool) -> Stdio:
    return Stdio(stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal)


def create_request(req: shim_pb2.CreateTaskRequest) -> ContainerRequest:
    if not req.bundle or not os.path.isabs(req.bundle):
        raise InvalidArgument(f"bundle must be an absolute path, got {req.bundle!r}")
    return ContainerRequest(
        id=container_id(req.id),
        bundle=req.bundle,
        rootfs=tuple(Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs),
        stdio=_stdio(req.stdin, req.stdout, req.stderr, req.terminal),
        checkpoint=req.checkpoint,
        config_path=config_path(req.options),
    )


def exec_request(req: shim_pb2.ExecProcessRequest) -> ExecRequest:
    if not req.exec_id:
        raise InvalidArgument("exec id must not be empty")
    return ExecRequest(
        container_id=container_id(req.id),
        exec_id=exec_id(req.exec_id),
        stdio=_stdio(req.stdin, req.stdout, req.stderr, req.terminal),
        process=_json_any(req.spec, PROCESS_SPEC_URL, "exec process spec"),
    )


def resources(req: shim_pb2.UpdateTaskRequest) -> Resources:
    return Resources(
        linux=_json_any(req.resources, RESOURCES_URL, "update resources"),
        annotations=dict(req.annotations),
    )


# --- encoding -------------------------------------------------------------------------------------


def timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def state_response(s: ProcessStatus) -> shim_pb2.StateResponse:
    resp = shim_pb2.StateResponse(
        id=s.container_id,
        exec_id=s.exec_id,
        bundle=s.bundle,
        pid=s.pid,
        status=_STATUS.get(s.status, task_pb2.UNKNOWN),
        stdin=s.stdio.stdin,
        stdout=s.stdio.stdout,
        stderr=s.stdio.stderr,
        terminal=s.stdio.terminal,
        exit_status=s.exit_status,
    )
    if s.exited_at is not None:
        resp.exited_at.CopyFrom(timestamp(s.exited_at))
    return resp


def delete_response(r: DeleteResult) -> shim_pb2.DeleteResponse:
    resp = shim_pb2.DeleteResponse(pid=r.pid, exit_status=r.exit_status)
    if r.exited_at is not None:
        resp.exited_at.CopyFrom(timestamp(r.exited_at))
    return resp


def wait_response(e: ExitStatus) -> shim_pb2.WaitResponse:
    return shim_pb2.WaitResponse(exit_status=e.status, exited_at=timestamp(e.exited_at))


def pids_response(infos: list[ProcessInfo]) -> shim_pb2.PidsResponse:
    return shim_pb2.PidsResponse(processes=[task_pb2.ProcessInfo(pid=i.pid) for i in infos])


def connect_response(c: ConnectResult) -> shim_pb2.ConnectResponse:
    return shim_pb2.ConnectResponse(shim_pid=c.shim_pid, task_pid=c.task_pid, version=c.version)


@cache
def host_uses_cgroup_v2() -> bool:
    """CRI accepts either Metrics type; report the one matching the host, as runc and Kata do."""
    return os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def stats_any(s: ContainerStats, *, cgroup_v2: bool | None = None) -> any_pb2.Any:
    """cgroups Metrics with the fields CRI and ``ctr task metrics`` read, bare type URL."""
    v2 = host_uses_cgroup_v2() if cgroup_v2 is None else cgroup_v2
    if v2:
        m2 = cg2.Metrics(
            pids=cg2.PidsStat(current=s.pids_current, limit=s.pids_limit),
            cpu=cg2.CPUStat(
                usage_usec=s.cpu_usage_ns // 1000,
                user_usec=s.cpu_user_ns // 1000,
                system_usec=s.cpu_system_ns // 1000,
            ),
            memory=cg2.MemoryStat(
                usage=s.memory_usage,
                usage_limit=s.memory_limit,
                inactive_file=s.memory_inactive_file,
                anon=s.memory_anon,
                file=s.memory_file,
                pgfault=s.pgfault,
                pgmajfault=s.pgmajfault,
            ),
            memory_events=cg2.MemoryEvents(oom_kill=s.oom_kills),
        )
        return any_pb2.Any(type_url="io.containerd.cgroups.v2.Metrics", value=m2.SerializeToString())
    m1 = cg1.Metrics(
        pids=cg1.PidsStat(current=s.pids_current, limit=s.pids_limit),
        cpu=cg1.CPUStat(usage=cg1.CPUUsage(total=s.cpu_usage_ns, kernel=s.cpu_system_ns, user=s.cpu_user_ns)),
        memory=cg1.MemoryStat(
            usage=cg1.MemoryEntry(usage=s.memory_usage, limit=s.memory_limit),
            total_inactive_file=s.memory_inactive_file,
            total_rss=s.memory_anon,
            total_cache=s.memory_file,
            total_pg_fault=s.pgfault,
            total_pg_maj_fault=s.pgmajfault,
        ),
    )
    return any_pb2.Any(type_url="io.containerd.cgroups.v1.Metrics", value=m1.SerializeToString())


def stats_response(s: ContainerStats) -> shim_pb2.StatsResponse:
    return shim_pb2.StatsResponse(stats=stats_any(s))


# --- events ---------------------------------------------------------------------------------------


def _mounts(mounts: tuple[Mount, ...]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def event_message(event: ev.TaskEvent) -> tuple[str, Any]:
    """``(topic, message)`` for a domain event (containerd's ``runtime/events.go`` topics)."""
    match event:
        case ev.TaskCreate():
            return "/tasks/create", events_pb2.TaskCreate(
                container_id=event.container_id,
                bundle=event.bundle,
                rootfs=_mounts(event.rootfs),
                io=events_pb2.TaskIO(
                    stdin=event.stdio.stdin,
                    stdout=event.stdio.stdout,
                    stderr=event.stdio.stderr,
                    terminal=event.stdio.terminal,
                ),
                checkpoint=event.checkpoint,
                pid=event.pid,
            )
        case ev.TaskStart():
            return "/tasks/start", events_pb2.TaskStart(container_id=event.container_id, pid=event.pid)
        case ev.TaskExit():
            return "/tasks/exit", events_pb2.TaskExit(
                container_id=event.container_id,
                id=event.id,
                pid=event.pid,
                exit_status=event.exit_status,
                exited_at=timestamp(event.exited_at),
            )
        case ev.TaskDelete():
            msg = events_pb2.TaskDelete(
                container_id=event.container_id, id=event.id, pid=event.pid, exit_status=event.exit_status
            )
            if event.exited_at is not None:
                msg.exited_at.CopyFrom(timestamp(event.exited_at))
            return "/tasks/delete", msg
        case ev.TaskExecAdded():
            return "/tasks/exec-added", events_pb2.TaskExecAdded(
                container_id=event.container_id, exec_id=event.exec_id
            )
        case ev.TaskExecStarted():
            return "/tasks/exec-started", events_pb2.TaskExecStarted(
                container_id=event.container_id, exec_id=event.exec_id, pid=event.pid
            )
        case ev.TaskPaused():
            return "/tasks/paused", events_pb2.TaskPaused(container_id=event.container_id)
        case ev.TaskResumed():
            return "/tasks/resumed", events_pb2.TaskResumed(container_id=event.container_id)
        case ev.TaskOOM():
            return "/tasks/oom", events_pb2.TaskOOM(container_id=event.container_id)
    raise TypeError(f"not a task event: {event!r}")


def event_any(event: ev.TaskEvent) -> tuple[str, any_pb2.Any]:
    """``(topic, Any)`` with a **bare** type URL (``containerd.events.TaskExit``): containerd 1.6
    cannot decode ``type.googleapis.com/...``."""
    topic, msg = event_message(event)
    return topic, any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


__all__ = [
    "PROCESS_SPEC_URL",
    "RESOURCES_URL",
    "config_path",
    "connect_response",
    "container_id",
    "create_request",
    "delete_response",
    "event_any",
    "event_message",
    "exec_id",
    "exec_request",
    "pids_response",
    "resources",
    "state_response",
    "stats_any",
    "stats_response",
    "timestamp",
    "wait_response",
]
