"""An in-memory ``SandboxBackend``: processes that exit when told to. No VM, no processes, no IO.

Drives the whole task service + ttrpc/gRPC edge in unit tests, and (only behind the explicit test
seam ``PYVM_TEST_BACKEND``, see ``shim/api/daemon.py``) a real shim daemon under a real containerd.

Behaviour:
- a started process runs until ``exit()`` is called, a terminating signal is sent, or its init
  process exits (like a PID namespace dying);
- an init process whose OCI ``process.args`` is ``["true"]`` / ``["false"]`` exits 0 / 1 at once
  after Start (handy for ``ctr run``);
- ``fail(method, exc)`` makes the next call of ``method`` raise ``exc``;
- ``calls`` records ``(method, container_id, exec_id)`` in order.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shim.errors import NotFound
from shim.sandbox.spec import (
    NON_TERMINATING_SIGNALS,
    ContainerRequest,
    ContainerStats,
    ExecRequest,
    ExitStatus,
    ProcessInfo,
    Resources,
)


@dataclass
class FakeProcess:
    container_id: str
    exec_id: str
    pid: int
    args: list[str] = field(default_factory=list)
    started: bool = False
    stdin_closed: bool = False
    size: tuple[int, int] = (0, 0)
    exit: asyncio.Future[ExitStatus] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def finish(self, status: ExitStatus) -> None:
        if not self.exit.done():
            self.exit.set_result(status)


class FakeBackend:
    """Implements ``shim.sandbox.backend.SandboxBackend`` in memory."""

    def __init__(self, *, pid: int | None = None) -> None:
        self._pid = os.getpid() if pid is None else pid
        self.processes: dict[tuple[str, str], FakeProcess] = {}
        self.paused: set[str] = set()
        self.resources: dict[str, Resources] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.shut_down = False
        self._failures: dict[str, BaseException] = {}
        self._oom: list[Callable[[str], None]] = []
        self._next_pid = 1000

    # -- test controls ---------------------------------------------------------------------------

    def fail(self, method: str, exc: BaseException) -> None:
        self._failures[method] = exc

    def exit(self, container_id: str, exec_id: str = "", status: int = 0) -> None:
        """Make a started process exit with ``status``."""
        self._proc(container_id, exec_id).finish(ExitStatus.now(status))

    def oom(self, container_id: str) -> None:
        for cb in self._oom:
            cb(container_id)

    # -- SandboxBackend ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._pid

    def _record(self, method: str, container_id: str = "", exec_id: str = "") -> None:
        self.calls.append((method, container_id, exec_id))
        exc = self._failures.pop(method, None)
        if exc is not None:
            raise exc

    def _proc(self, container_id: str, exec_id: str) -> FakeProcess:
        p = self.processes.get((container_id, exec_id))
        if p is None:
            raise NotFound(f"fake: no process {container_id}/{exec_id or 'init'}")
        return p

    async def create_container(self, request: ContainerRequest) -> int:
        self._record("create_container", request.id)
        args: list[str] = []
        try:
            spec = json.loads((Path(request.bundle) / "config.json").read_text())
            args = list(spec.get("process", {}).get("args") or [])
        except (OSError, ValueError):
            pass
        self.processes[(request.id, "")] = FakeProcess(request.id, "", self._pid, args)
        return self._pid

    async def start(self, container_id: str, exec_id: str) -> int:
        self._record("start", container_id, exec_id)
        p = self._proc(container_id, exec_id)
        p.started = True
        if not exec_id and p.args[:1] in (["true"], ["false"]):
            loop = asyncio.get_running_loop()
            loop.call_soon(p.finish, ExitStatus.now(0 if p.args[0] == "true" else 1))
        return p.pid

    async def exec(self, request: ExecRequest) -> None:
        self._record("exec", request.container_id, request.exec_id)
        self._next_pid += 1
        args = list(request.process.get("args") or [])
        self.processes[(request.container_id, request.exec_id)] = FakeProcess(
            request.container_id, request.exec_id, self._pid, args
        )

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        self._record("kill", container_id, exec_id)
        targets = (
            [p for (cid, _), p in self.processes.items() if cid == container_id]
            if all
            else [self._proc(container_id, exec_id)]
        )
        if signal in NON_TERMINATING_SIGNALS:
            return
        for p in targets:
            p.finish(ExitStatus.killed_by(signal))
            if not p.exec_id:
                self._end_execs(container_id, signal)

    def _end_execs(self, container_id: str, signal: int) -> None:
        for (cid, eid), p in self.processes.items():
            if cid == container_id and eid and p.started:
                p.finish(ExitStatus.killed_by(signal))

    async def wait(self, container_id: str, exec_id: str) -> ExitStatus:
        self._record("wait", container_id, exec_id)
        p = self._proc(container_id, exec_id)
        status = await asyncio.shield(p.exit)
        if not exec_id:
            self._end_execs(container_id, 9)
        return status

    async def pids(self, container_id: str) -> list[ProcessInfo]:
        self._record("pids", container_id)
        return [
            ProcessInfo(p.pid, eid)
            for (cid, eid), p in self.processes.items()
            if cid == container_id and p.started and not p.exit.done()
        ]

    async def stats(self, container_id: str) -> ContainerStats:
        self._record("stats", container_id)
        self._proc(container_id, "")
        return ContainerStats(
            cpu_usage_ns=1_000_000, memory_usage=64 << 20, memory_limit=256 << 20, pids_current=1
        )

    async def update(self, container_id: str, resources: Resources) -> None:
        self._record("update", container_id)
        self.resources[container_id] = resources

    async def pause(self, container_id: str) -> None:
        self._record("pause", container_id)
        self.paused.add(container_id)

    async def resume(self, container_id: str) -> None:
        self._record("resume", container_id)
        self.paused.discard(container_id)

    async def close_io(self, container_id: str, exec_id: str) -> None:
        self._record("close_io", container_id, exec_id)
        self._proc(container_id, exec_id).stdin_closed = True

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        self._record("resize_pty", container_id, exec_id)
        self._proc(container_id, exec_id).size = (width, height)

    async def delete(self, container_id: str, exec_id: str) -> None:
        self._record("delete", container_id, exec_id)
        if exec_id:
            self.processes.pop((container_id, exec_id), None)
        else:
            for key in [k for k in self.processes if k[0] == container_id]:
                del self.processes[key]

    async def shutdown(self) -> None:
        self._record("shutdown")
        self.shut_down = True
        for p in self.processes.values():
            p.finish(ExitStatus.killed_by(9))

    def on_oom(self, callback: Callable[[str], None]) -> None:
        self._oom.append(callback)


__all__ = ["FakeBackend", "FakeProcess"]
