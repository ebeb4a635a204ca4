"""One process the agent started in a container (the init or an exec) and its streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.errors import FailedPrecondition, NotFound
from shim.guestagent.reaper import Exit
from shim.guestagent.stdio import OutputStream, StdinWriter, set_winsize

if TYPE_CHECKING:
    from collections.abc import Callable

#: how long an exit waits for stdout/stderr EOF when a leftover child keeps a pipe open
EXIT_IO_GRACE = 2.0


@dataclass(frozen=True)
class WaitResult:
    exit_status: int
    exited_at: float
    oom_killed: bool


class Process:
    """A started process. Owned by the event loop: ``_result`` is the one task that turns the
    reaper's exit into the answer of WaitProcess, after the output streams reached EOF.
    """

    def __init__(
        self,
        container_id: str,
        exec_id: str,
        *,
        stdin: StdinWriter,
        stdout: OutputStream,
        stderr: OutputStream,
        pty_master: int | None,
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = 0
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pty_master = pty_master
        self._exit: Exit | None = None
        self._result: asyncio.Task[WaitResult] | None = None
        self.waited = False

    @property
    def exited(self) -> bool:
        return self._exit is not None

    @property
    def drained(self) -> bool:
        """Exited, waited for, and both streams fully read."""
        return self.waited and self.stdout.at_eof and self.stderr.at_eof

    def watch(
        self,
        pid: int,
        exit_future: asyncio.Future[Exit],
        on_exit: Callable[[Process], bool],
        grace: float = EXIT_IO_GRACE,
    ) -> None:
        """Start tracking ``pid``. ``on_exit(process)`` runs once it exited and its streams are
        done; it returns whether the container's cgroup saw an OOM kill.
        """
        self.pid = pid
        self._result = asyncio.create_task(
            self._finish(exit_future, on_exit, grace), name=f"exit-{self.container_id}-{self.exec_id}"
        )

    async def _finish(
        self, exit_future: asyncio.Future[Exit], on_exit: Callable[[Process], bool], grace: float
    ) -> WaitResult:
        ex = await exit_future
        self._exit = ex
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(self.stdout.wait_eof(), self.stderr.wait_eof())
        self.stdin.abort()
        oom = on_exit(self)
        return WaitResult(ex.status, ex.exited_at, oom)

    async def wait(self) -> WaitResult:
        if self._result is None:
            raise FailedPrecondition(f"process {self.exec_id or 'init'} was not started")
        result = await asyncio.shield(self._result)
        self.waited = True
        return result

    def signal(self, sig: int) -> None:
        """Send ``sig``. Raises ``NotFound`` once the process has exited (containerd tolerates it).

        Safe against pid reuse: we are the process's reaper, and its pid is not reaped (free for
        reuse) before ``_exit`` is set in the same loop step.
        """
        if self._exit is not None or self.pid <= 0:
            raise NotFound("process already finished", container_id=self.container_id, exec_id=self.exec_id)
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError as exc:
            raise NotFound("process already finished") from exc

    def resize(self, rows: int, columns: int) -> None:
        if self._pty_master is None:
            raise FailedPrecondition("the process has no terminal")
        try:
            set_winsize(self._pty_master, rows, columns)
        except OSError as exc:
            raise FailedPrecondition(f"cannot resize the terminal: {exc}") from exc

    def close(self) -> None:
        """Release every fd; kill nothing. Called when the container is removed."""
        self.stdin.abort()
        self.stdout.close()
        self.stderr.close()
        if self._pty_master is not None:
            # the output stream owns a dup of it, see Container
            with contextlib.suppress(OSError):
                os.close(self._pty_master)
            self._pty_master = None
        if self._result is not None and not self._result.done():
            self._result.cancel()


def signal_number(value: int) -> int:
    """Validate a signal number from the host."""
    if not 1 <= value <= signal.SIGRTMAX:
        raise ValueError(f"signal {value} is out of range 1..{int(signal.SIGRTMAX)}")
    return value
