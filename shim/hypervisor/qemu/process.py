"""Child processes of a VM (QEMU, virtiofsd): spawn, watch, stop, reap.

A :class:`Child` owns one process. Its :attr:`Child.exited` task resolves with the exit status the
moment the kernel reports it (asyncio's child watcher), so a QEMU killed from outside is noticed within
milliseconds, not at the next poll. Each child runs in its own session, so a signal sent to the shim's
process group does not reach it; stopping is always explicit (:meth:`Child.stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from shim.errors import VMLaunchFailure
from shim.log import get_logger

log = get_logger("pyvm.hypervisor.process")

#: util-linux's setpriv (Essential on Debian) sets PR_SET_PDEATHSIG and execs the real binary: the
#: child is SIGKILLed when the shim that spawned it dies. A ``preexec_fn`` doing the same prctl ran
#: Python between fork and exec, which is unsafe in a threaded process: in gRPC mode (grpcio's threads)
#: QEMU "died of SIGSEGV" before exec, one start in a few.
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
_SETPRIV_EXE = os.path.realpath(SETPRIV)  # what /proc/<pid>/exe shows until it execs the binary


def _dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the process dies with its parent (the pid stays the same across exec)."""
    if not os.access(SETPRIV, os.X_OK):
        log.warning("setpriv not found: QEMU and virtiofsd will outlive a killed shim", setpriv=SETPRIV)
        return list(argv)
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def tail(path: Path | None, lines: int = 20, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log file ("" if absent), for error reports."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    # strip terminal control sequences firmware prints on the serial console
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or ch.isprintable())
    return "\n".join(text.splitlines()[-lines:])


def describe_status(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


class Child:
    """One spawned process. Create with :func:`spawn`."""

    def __init__(
        self, name: str, argv: Sequence[str], proc: asyncio.subprocess.Process, log_path: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc = proc
        self.log_path = log_path
        self.started = time.monotonic()
        #: resolves with the exit status (negative = killed by that signal); never raises
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait(), name=f"wait-{name}-{proc.pid}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, term_grace: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after ``term_grace`` seconds; always reaped on return."""
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(term_grace):
                    await asyncio.shield(self.exited)
            except TimeoutError:
                log.warning("child ignored SIGTERM, killing", child=self.name, pid=self.pid)
                self.signal(signal.SIGKILL)
        return await asyncio.shield(self.exited)

    async def wait(self, timeout: float) -> int | None:  # noqa: ASYNC109
        """The exit status if the process exits within ``timeout`` seconds, else None."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.exited)
        except TimeoutError:
            return None


async def spawn(name: str, argv: Sequence[str], log_path: Path, *, pass_fds: Sequence[int] = ()) -> Child:
    """Start ``argv`` with stdin from /dev/null and stdout+stderr appended to ``log_path``; the
    descriptors ``pass_fds`` are inherited under the same numbers (no other).

    The child gets its own session (signals to the shim's group do not reach it) and is killed when
    the shim process dies (PR_SET_PDEATHSIG via setpriv), so no VM outlives its shim.

    Raises VMLaunchFailure if the binary cannot be executed at all.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # a local append-only log file: opening it does not block in any way that matters
    with open(log_path, "ab", buffering=0) as out:  # noqa: ASYNC230
        try:
            proc = await asyncio.create_subprocess_exec(
                *_dying_with_parent(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except OSError as exc:
            raise VMLaunchFailure(
                f"cannot execute {name} {argv[0]}: {exc.strerror or exc}",
                argv=list(argv),
                exit_code=None,
            ) from exc
    await _past_setpriv(proc)
    log.debug("spawned", child=name, pid=proc.pid, argv=list(argv))
    return Child(name, argv, proc, log_path)


async def _past_setpriv(proc: asyncio.subprocess.Process, timeout: float = 2.0) -> None:  # noqa: ASYNC109
    """Wait (~1 ms) until setpriv has exec'd the real binary: only from then on is the death signal
    set. A shim killed in between left the child running (seen as a flaky test, 1 run in ~6)."""
    deadline = time.monotonic() + timeout
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{proc.pid}/exe") != _SETPRIV_EXE:
                return
        except OSError:  # gone (or a zombie): nothing left to protect
            return
        await asyncio.sleep(0.001)


async def wait_for_path(path: Path, child: Child, timeout: float, *, what: str) -> None:  # noqa: ASYNC109
    """Wait until ``path`` exists while ``child`` runs. Raises VMLaunchFailure if it exits or times out."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):  # noqa: ASYNC240 (a stat on a local dir, polled every 10 ms)
        if child.returncode is not None or child.exited.done():
            rc = await child.exited
            raise launch_failure(child, f"{child.name} exited ({describe_status(rc)}) before {what} appeared")
        if time.monotonic() > deadline:
            raise launch_failure(child, f"{what} ({path}) did not appear within {timeout:g} s")
        await asyncio.sleep(0.01)


def launch_failure(child: Child, message: str, *, console_log: Path | None = None) -> VMLaunchFailure:
    log_tail = tail(child.log_path)
    console_tail = tail(console_log)
    parts = [message]
    if log_tail:
        parts.append(f"{child.name} log:\n{log_tail}")
    if console_tail:
        parts.append(f"console:\n{console_tail}")
    return VMLaunchFailure(
        "\n".join(parts),
        argv=child.argv,
        exit_code=child.returncode,
        log_tail=log_tail,
        console_tail=console_tail,
    )


__all__ = ["Child", "describe_status", "launch_failure", "spawn", "tail", "wait_for_path"]
