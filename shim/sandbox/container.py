"""Containers and processes as the task service sees them: state machine, pid, exit, waiters.

Only touched from the event loop. ``Process.lock`` serializes the lifecycle calls of one process
(Start, Kill of a created process, Delete) so that an exit cannot be recorded while a Start is still
half done.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shim.log import get_logger
from shim.sandbox.spec import ExitStatus, Mount, Stdio
from shim.sandbox.state import (
    CONTAINER_TRANSITIONS,
    PROCESS_TRANSITIONS,
    ContainerState,
    ProcessState,
    StateMachine,
)

log = get_logger(__name__)


class Process:
    """An init (``exec_id == ""``) or exec process."""

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.exit: ExitStatus | None = None
        self.lock = asyncio.Lock()
        self._exited = asyncio.Event()
        what = f"task {container_id}" if not exec_id else f"exec {exec_id} of task {container_id}"
        self.machine: StateMachine[ProcessState] = StateMachine(
            what, ProcessState.CREATED, PROCESS_TRANSITIONS, self._log_change
        )

    @property
    def state(self) -> ProcessState:
        return self.machine.state

    def _log_change(self, old: ProcessState, new: ProcessState) -> None:
        log.debug(
            "process state",
            container_id=self.container_id,
            exec_id=self.exec_id or None,
            old=old.value,
            new=new.value,
        )

    def set_exited(self, exit: ExitStatus) -> None:
        """Record the exit (CREATED/RUNNING -> STOPPED) and release every ``wait()``er."""
        self.machine.transition(ProcessState.STOPPED, "record the exit of")
        self.exit = exit
        self._exited.set()

    async def wait(self) -> ExitStatus:
        """Return the exit once there is one (immediately if the process has exited)."""
        await self._exited.wait()
        assert self.exit is not None
        return self.exit


@dataclass
class Container:
    """One container: its init process, its execs and its own state (init state + paused)."""

    id: str
    bundle: str
    rootfs: tuple[Mount, ...]
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    machine: StateMachine[ContainerState] = field(init=False)

    def __post_init__(self) -> None:
        self.machine = StateMachine(f"task {self.id}", ContainerState.CREATED, CONTAINER_TRANSITIONS)

    @property
    def state(self) -> ContainerState:
        return self.machine.state

    def process(self, exec_id: str) -> Process | None:
        return self.init if not exec_id else self.execs.get(exec_id)


__all__ = ["Container", "Process"]
