"""The agent's one owner of ``waitpid``: spawns children, adopts re-parented ones, reaps everything.

The agent is PID 1 in the guest (or a child subreaper on a host), so every orphan lands here. Only
``Reaper`` calls ``waitpid``; nothing else in the agent may (no ``subprocess``, no asyncio child
watchers), or exit statuses would be stolen.

State is owned by the event loop thread: ``_waiters`` maps a pid we care about to the future of its
exit, ``_unclaimed`` keeps the statuses of pids nobody waited for yet (a process started by
``crun exec -d`` may exit before we read its pid file). Spawning and registering happen in one
synchronous step on the loop, so a child can never be reaped before its waiter exists.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shim.log import get_logger

log = get_logger(__name__)

PR_SET_CHILD_SUBREAPER = 36
_MAX_UNCLAIMED = 4096
# every signal a child may have inherited as ignored or caught from us (Python ignores SIGPIPE)
_RESET_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


@dataclass(frozen=True)
class Exit:
    """How a process ended, as its parent sees it."""

    pid: int
    status: int  # exit code, or 128 + signal number
    exited_at: float  # time.time()
    signaled: bool = False


def exit_status(wait_status: int) -> tuple[int, bool]:
    """``(status, signaled)`` for a raw ``waitpid`` status: the exit code, or ``128+signal``."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status), True
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status), False
    return 255, False


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to us. True if we are PID 1 or the prctl worked."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed", errno=ctypes.get_errno())
    except OSError as exc:
        log.warning("prctl unavailable", error=str(exc))
    return False


class Reaper:
    """Reaps every child on SIGCHLD and resolves the futures of the pids somebody waits for."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, asyncio.Future[Exit]] = {}
        self._unclaimed: collections.OrderedDict[int, Exit] = collections.OrderedDict()

    def start(self) -> None:
        """Install the SIGCHLD handler on the running loop and reap what already exited."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        """Collect every exited child (non-blocking)."""
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            status, signaled = exit_status(wstatus)
            ex = Exit(pid, status, time.time(), signaled)
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(ex)
            else:
                self._unclaimed[pid] = ex
                while len(self._unclaimed) > _MAX_UNCLAIMED:
                    self._unclaimed.popitem(last=False)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        setsid: bool = False,
    ) -> tuple[int, asyncio.Future[Exit]]:
        """Start ``argv`` with the given fds as 0/1/2 (``None``: /dev/null) and every signal at its
        default. Returns the pid and the future of its exit. Raises ``OSError`` if it cannot start.
        """
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            actions = [
                (os.POSIX_SPAWN_DUP2, stdin if stdin is not None else devnull, 0),
                (os.POSIX_SPAWN_DUP2, stdout if stdout is not None else devnull, 1),
                (os.POSIX_SPAWN_DUP2, stderr if stderr is not None else devnull, 2),
            ]
            pid = os.posix_spawnp(
                argv[0],
                list(argv),
                dict(env if env is not None else os.environ),
                file_actions=actions,
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
                setsid=setsid,
            )
        finally:
            os.close(devnull)
        # a stale status of an earlier process with this pid is no longer meaningful
        self._unclaimed.pop(pid, None)
        return pid, self._future(pid)

    def adopt(self, pid: int) -> asyncio.Future[Exit]:
        """The future exit of ``pid``, a process that became our child by re-parenting.

        If it already exited and was reaped, resolves at once. If it is gone and was never ours
        (it died before re-parenting and its old parent reaped it), resolves with status 255.
        """
        fut = self._future(pid)
        ex = self._unclaimed.pop(pid, None)
        if ex is not None:
            self._waiters.pop(pid, None)
            fut.set_result(ex)
            return fut
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self._waiters.pop(pid, None)
            log.warning("adopted process is gone; its exit status is unknown", pid=pid)
            fut.set_result(Exit(pid, 255, time.time()))
        except PermissionError:
            pass
        return fut

    def _future(self, pid: int) -> asyncio.Future[Exit]:
        loop = self._loop or asyncio.get_running_loop()
        fut = self._waiters.get(pid)
        if fut is None or fut.done():
            fut = loop.create_future()
            self._waiters[pid] = fut
        return fut


async def run(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    input_fd: int | None = None,
    timeout: float | None = None,  # noqa: ASYNC109
    stdio: tuple[int | None, int | None, int | None] | None = None,
) -> tuple[int, bytes]:
    """Run ``argv`` to completion; return ``(exit status, stderr+stdout tail)``.

    ``stdio`` replaces the captured output with the given fds (for crun, whose stdio becomes the
    container's). Raises ``OSError`` if it cannot start and ``TimeoutError`` (after killing it).
    """
    loop = asyncio.get_running_loop()
    if stdio is None:
        r, w = os.pipe()
        try:
            pid, fut = reaper.spawn(argv, stdin=input_fd, stdout=w, stderr=w)
        finally:
            os.close(w)
        out = bytearray()
        done = loop.create_future()
        os.set_blocking(r, False)

        def on_readable() -> None:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if chunk:
                out.extend(chunk)
                if len(out) > 65536:
                    del out[: len(out) - 65536]
            else:
                loop.remove_reader(r)
                if not done.done():
                    done.set_result(None)

        loop.add_reader(r, on_readable)
        try:
            async with asyncio.timeout(timeout):
                ex = await fut
                await done
        except TimeoutError:
            _kill(pid)
            raise
        finally:
            loop.remove_reader(r)
            os.close(r)
        return ex.status, bytes(out)
    pid, fut = reaper.spawn(argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
    try:
        async with asyncio.timeout(timeout):
            ex = await fut
    except TimeoutError:
        _kill(pid)
        raise
    return ex.status, b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
