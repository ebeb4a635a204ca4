"""Task orchestration: the containerd task API's semantics over a ``SandboxBackend``.

The service owns the containers table, every lifecycle state machine, the Wait bookkeeping and the
order of events; the backend owns the mechanism. Event order is structural:

- ``TaskCreate`` is published after the backend created the container, before Create returns;
- ``TaskStart``/``TaskExecStarted`` is published *before* the exit watcher of that process exists,
  and only the watcher publishes its ``TaskExit``: no exit can overtake its start;
- ``TaskDelete`` is published after the process is STOPPED (its exit was published) or was never
  started;
- every event goes through one ``EventSink`` whose ``publish`` only enqueues (one queue, one
  forwarder: ``shim/api/events.py``).

Ids are validated once at the API edge; here they are only looked up. Everything runs on the event
loop; ``Process.lock`` serializes the lifecycle calls of one process.
"""

from __future__ import annotations

import asyncio
import signal as _signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from shim.errors import AlreadyExists, FailedPrecondition, NotFound, Unimplemented
from shim.log import get_logger
from shim.sandbox.backend import SandboxBackend
from shim.sandbox.container import Container, Process
from shim.sandbox.spec import (
    NON_TERMINATING_SIGNALS,
    UNKNOWN_EXIT_STATUS,
    ContainerRequest,
    ContainerStats,
    ExecRequest,
    ExitStatus,
    ProcessInfo,
    ProcessStatus,
    Resources,
)
from shim.sandbox.state import ContainerState, ProcessState
from shim.service import events as ev

log = get_logger(__name__)

CHECKPOINT_UNSUPPORTED = (
    "checkpoint is not supported by pyvm: a container's state lives inside its VM and cannot be "
    "checkpointed through the task API"
)


@dataclass(frozen=True)
class DeleteResult:
    pid: int
    exit_status: int
    exited_at: datetime | None


@dataclass(frozen=True)
class ConnectResult:
    shim_pid: int
    task_pid: int
    version: str


class TaskService:
    """One per shim daemon (= one sandbox).

    ``on_containers_changed(containers)`` receives ``{container_id: bundle}`` after every Create and
    Delete (the daemon persists it for ``delete``). ``shutdown_requested`` is set when a Shutdown
    arrives and no container is left: the daemon then answers, tears down and exits.
    """

    def __init__(
        self,
        backend: SandboxBackend,
        events: ev.EventSink,
        *,
        shim_pid: int,
        version: str,
        on_containers_changed: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        self._backend = backend
        self._events = events
        self._shim_pid = shim_pid
        self._version = version
        self._on_containers_changed = on_containers_changed
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._closed = False
        self.shutdown_requested = asyncio.Event()
        backend.on_oom(self._on_oom)

    # -- lookups -------------------------------------------------------------------------------------

    @property
    def container_ids(self) -> list[str]:
        return list(self._containers)

    def _container(self, container_id: str) -> Container:
        c = self._containers.get(container_id)
        if c is None:
            raise NotFound(f"task {container_id} not found", container_id=container_id)
        return c

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        c = self._container(container_id)
        p = c.process(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} of task {container_id} not found", exec_id=exec_id)
        return c, p

    def _changed(self) -> None:
        if self._on_containers_changed is not None:
            self._on_containers_changed({cid: c.bundle for cid, c in self._containers.items()})

    # -- lifecycle -----------------------------------------------------------------------------------

    async def create(self, request: ContainerRequest) -> int:
        """Create a container and its init process; publishes TaskCreate. Returns the pid.

        :raises AlreadyExists: a container with this id exists (or is being created).
        :raises FailedPrecondition: the shim is shutting down, or the backend cannot create it.
        """
        if self._closed or self.shutdown_requested.is_set():
            raise FailedPrecondition(f"shim is shutting down; task {request.id} not created")
        if request.id in self._containers or request.id in self._creating:
            raise AlreadyExists(f"task {request.id} already exists", container_id=request.id)
        self._creating.add(request.id)
        try:
            pid = await self._backend.create_container(request)
        finally:
            self._creating.discard(request.id)
        init = Process(request.id, "", request.stdio)
        init.pid = pid
        self._containers[request.id] = Container(request.id, request.bundle, request.rootfs, init)
        self._changed()
        self._events.publish(
            ev.TaskCreate(request.id, request.bundle, request.rootfs, request.stdio, request.checkpoint, pid)
        )
        log.info("task created", container_id=request.id, pid=pid)
        return pid

    async def start(self, container_id: str, exec_id: str) -> int:
        """Start a created init or exec process; publishes TaskStart / TaskExecStarted. Returns the pid.

        :raises InvalidState: the process is not CREATED (or, for an exec, the task is not running).
        """
        c, p = self._process(container_id, exec_id)
        async with p.lock:
            p.machine.require("start", ProcessState.CREATED)
            if exec_id:
                c.machine.require(f"start exec {exec_id}", ContainerState.RUNNING)
            pid = await self._backend.start(container_id, exec_id)
            p.pid = pid or p.pid
            p.machine.transition(ProcessState.RUNNING, "start")
            if exec_id:
                self._events.publish(ev.TaskExecStarted(container_id, exec_id, p.pid))
            else:
                c.machine.transition(ContainerState.RUNNING, "start")
                self._events.publish(ev.TaskStart(container_id, p.pid))
            # Only now may an exit of this process be published (see the module docstring).
            self._watch(c, p)
        return p.pid

    def _watch(self, c: Container, p: Process) -> None:
        task = asyncio.create_task(self._watch_exit(c, p), name=f"exit-watcher {c.id}/{p.exec_id or 'init'}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch_exit(self, c: Container, p: Process) -> None:
        try:
            exit = await self._backend.wait(c.id, p.exec_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The process cannot be watched any more (VM gone, agent lost): report it as dead, so
            # Wait returns and containerd can clean up, rather than leaving it "running" forever.
            log.error("lost track of process", container_id=c.id, exec_id=p.exec_id or None, error=str(exc))
            exit = ExitStatus.now(UNKNOWN_EXIT_STATUS)
        async with p.lock:
            if p.state is not ProcessState.RUNNING:
                return
            self._record_exit(c, p, exit)

    def _record_exit(self, c: Container, p: Process, exit: ExitStatus) -> None:
        p.set_exited(exit)
        if not p.exec_id and not c.machine.is_in(ContainerState.STOPPED, ContainerState.DELETED):
            c.machine.transition(ContainerState.STOPPED, "record the exit of")
        self._events.publish(ev.TaskExit(c.id, p.exec_id or c.id, p.pid, exit.status, exit.exited_at))
        log.info("process exited", container_id=c.id, exec_id=p.exec_id or None, exit_status=exit.status)

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        """Signal a process. A created-but-never-started task (init) that gets a terminating signal is
        STOPPED with status 128+signal and its Wait released (containerd's force-delete needs it).
        An exec that is not started is refused, as runc's shim does ("process not created"): its
        client is between Exec and Start, and a Start that then failed would make containerd's client
        wait for output from a process that never ran (``ctr task exec`` hung forever).

        :raises NotFound: unknown task/exec, or the process already finished.
        :raises FailedPrecondition: the exec is not started yet.
        """
        c, p = self._process(container_id, exec_id)
        if exec_id and p.state is ProcessState.CREATED:
            async with p.lock:  # a Start in progress: signal what it started
                if p.state is ProcessState.CREATED:
                    raise FailedPrecondition(
                        f"exec {exec_id} of task {container_id} is not started: no process to signal yet",
                        container_id=container_id,
                        exec_id=exec_id,
                    )
        if p.state is ProcessState.CREATED:
            async with p.lock:
                if p.state is ProcessState.CREATED:
                    if signal in NON_TERMINATING_SIGNALS:
                        return
                    try:
                        await self._backend.kill(container_id, exec_id, signal, all)
                    except NotFound:
                        pass  # nothing runs yet; stopping it is all there is to do
                    self._record_exit(c, p, ExitStatus.killed_by(signal))
                    return
        if p.state is not ProcessState.RUNNING:
            raise NotFound(f"{p.machine.what}: process already finished", container_id=container_id)
        await self._backend.kill(container_id, exec_id, signal, all)

    async def delete(self, container_id: str, exec_id: str) -> DeleteResult:
        """Delete a stopped or never-started process; the init process takes its container along
        (publishes TaskDelete). A never-started process is reported as killed (137).

        :raises InvalidState: the process is running.
        """
        c, p = self._process(container_id, exec_id)
        async with p.lock:
            p.machine.require("delete", ProcessState.CREATED, ProcessState.STOPPED)
            await self._backend.delete(container_id, exec_id)
            if p.state is ProcessState.CREATED:
                p.set_exited(ExitStatus.killed_by(_signal.SIGKILL))
                if not exec_id:
                    c.machine.transition(ContainerState.STOPPED, "delete")
            p.machine.transition(ProcessState.DELETED, "delete")
            assert p.exit is not None
            if exec_id:
                c.execs.pop(exec_id, None)
            else:
                c.machine.transition(ContainerState.DELETED, "delete")
                del self._containers[container_id]
                self._changed()
                self._events.publish(
                    ev.TaskDelete(container_id, container_id, p.pid, p.exit.status, p.exit.exited_at)
                )
                log.info("task deleted", container_id=container_id)
        return DeleteResult(p.pid, p.exit.status, p.exit.exited_at)

    async def exec(self, request: ExecRequest) -> None:
        """Add an exec process; publishes TaskExecAdded.

        :raises AlreadyExists: the exec id is taken. :raises InvalidState: the task is not running.
        """
        c = self._container(request.container_id)
        c.machine.require(f"exec {request.exec_id} in", ContainerState.RUNNING)
        if request.exec_id in c.execs:
            raise AlreadyExists(
                f"exec {request.exec_id} of task {c.id} already exists", exec_id=request.exec_id
            )
        p = Process(c.id, request.exec_id, request.stdio)
        c.execs[request.exec_id] = p
        try:
            await self._backend.exec(request)
        except BaseException:
            c.execs.pop(request.exec_id, None)
            raise
        self._events.publish(ev.TaskExecAdded(c.id, request.exec_id))

    async def wait(self, container_id: str, exec_id: str) -> ExitStatus:
        """Block until the process has exited (no deadline); immediate if it already has."""
        _, p = self._process(container_id, exec_id)
        return await p.wait()

    def state(self, container_id: str, exec_id: str) -> ProcessStatus:
        c, p = self._process(container_id, exec_id)
        if p.state is ProcessState.DELETED:
            raise NotFound(f"{p.machine.what} not found")
        status = p.state.value
        if p.state is ProcessState.RUNNING and c.state is ContainerState.PAUSED:
            status = "paused"
        return ProcessStatus(
            container_id=c.id,
            exec_id=exec_id,
            bundle=c.bundle,
            pid=p.pid,
            status=status,
            stdio=p.stdio,
            exit_status=p.exit.status if p.exit else 0,
            exited_at=p.exit.exited_at if p.exit else None,
        )

    async def pause(self, container_id: str) -> None:
        c = self._container(container_id)
        c.machine.require("pause", ContainerState.RUNNING)
        await self._backend.pause(container_id)
        c.machine.transition(ContainerState.PAUSED, "pause")
        self._events.publish(ev.TaskPaused(container_id))

    async def resume(self, container_id: str) -> None:
        c = self._container(container_id)
        c.machine.require("resume", ContainerState.PAUSED)
        await self._backend.resume(container_id)
        c.machine.transition(ContainerState.RUNNING, "resume")
        self._events.publish(ev.TaskResumed(container_id))

    async def pids(self, container_id: str) -> list[ProcessInfo]:
        self._container(container_id)
        return await self._backend.pids(container_id)

    async def stats(self, container_id: str) -> ContainerStats:
        self._container(container_id)
        return await self._backend.stats(container_id)

    async def update(self, container_id: str, resources: Resources) -> None:
        c = self._container(container_id)
        c.machine.require("update", ContainerState.CREATED, ContainerState.RUNNING, ContainerState.PAUSED)
        await self._backend.update(container_id, resources)

    async def close_io(self, container_id: str, exec_id: str) -> None:
        """Close the process's stdin; a no-op once the process has stopped."""
        _, p = self._process(container_id, exec_id)
        if p.state in (ProcessState.CREATED, ProcessState.RUNNING):
            await self._backend.close_io(container_id, exec_id)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        _, p = self._process(container_id, exec_id)
        p.machine.require("resize the console of", ProcessState.CREATED, ProcessState.RUNNING)
        await self._backend.resize_pty(container_id, exec_id, width, height)

    async def checkpoint(self, container_id: str) -> None:
        """:raises Unimplemented: always (after checking the task exists)."""
        self._container(container_id)
        raise Unimplemented(CHECKPOINT_UNSUPPORTED)

    def connect(self, container_id: str) -> ConnectResult:
        """Cheap; unknown ids report task pid 0 (as runc does)."""
        c = self._containers.get(container_id)
        task_pid = c.init.pid if c is not None else self._backend.pid
        return ConnectResult(self._shim_pid, task_pid, self._version)

    def shutdown(self) -> bool:
        """Request the daemon's exit if no container is left; returns whether it will exit."""
        if self._containers or self._creating:
            return False
        self.shutdown_requested.set()
        return True

    async def close(self) -> None:
        """Stop watching processes and tear the sandbox down. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in list(self._watchers):
            t.cancel()
        if self._watchers:
            await asyncio.wait(list(self._watchers))
        await self._backend.shutdown()

    def _on_oom(self, container_id: str) -> None:
        if container_id in self._containers:
            self._events.publish(ev.TaskOOM(container_id))


__all__ = ["CHECKPOINT_UNSUPPORTED", "ConnectResult", "DeleteResult", "TaskService"]
