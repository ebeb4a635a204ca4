"""The host end of a process's stdio: containerd's FIFOs, ``file://`` and ``binary://`` URIs.

Independent of where the process runs: the VM backend pumps bytes between these ends and the guest
agent's streams. Rules (containerd ``pkg/process/io.go``, notes ``containerd-shim-protocol.md`` §5):

- the scheme is decided by **stdout**: "" or none -> FIFO paths; ``file://`` -> one file for stdout
  and stderr (O_APPEND|O_CREAT); ``binary://`` -> a logger process (fd 3 = stdout pipe, fd 4 =
  stderr pipe, fd 5 = ready pipe; args = query key/value pairs; env ``CONTAINER_ID``,
  ``CONTAINER_NAMESPACE``); anything else -> InvalidArgument "unknown STDIO scheme";
- stdout/stderr FIFO: open a read handle O_RDONLY|O_NONBLOCK **first**, then O_WRONLY (which then
  cannot block), and keep both: writes never hit EPIPE if the client goes away;
- stdin FIFO: a blocking O_RDONLY open in a thread (a non-blocking one would read EOF before the
  client opened its end);
- terminal: stdout only; ``stderr`` is ignored even if set (nobody reads it: opening it would block);
- drain before exit: ``close()`` writes out everything accepted so far and only then closes; the
  exit may be reported only after it returns.

API used by the VM backend (``shim/sandbox/vm.py``): ``await open_host_io(stdio, container_id=,
namespace=)`` -> ``HostIO`` with ``stdout``/``stderr`` (``await .write(data)``) and ``stdin``
(``await .read()`` -> b"" at EOF, ``.request_close()`` for CloseIO), each ``None`` when absent;
``await HostIO.close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from shim.errors import InvalidArgument
from shim.sandbox.spec import Stdio

READ_CHUNK = 32 * 1024
LOGGER_STOP_TIMEOUT = 12.0  # containerd waits this long for a binary logger after SIGTERM


@dataclass(frozen=True)
class StdioPlan:
    """What ``Stdio`` asks for, decided without touching the filesystem."""

    kind: str  # "null" | "fifo" | "file" | "binary"
    stdin: str
    stdout: str  # FIFO path, file path, or logger binary path
    stderr: str  # FIFO path ("" when absent or terminal)
    args: tuple[str, ...] = ()  # binary logger args


def plan(stdio: Stdio) -> StdioPlan:
    """:raises InvalidArgument: an unknown scheme or a URI without a path."""
    out = stdio.stdout
    stderr = "" if stdio.terminal else stdio.stderr
    if not out:
        return StdioPlan("fifo" if (stdio.stdin or stderr) else "null", stdio.stdin, "", stderr)
    url = urlsplit(out)
    if url.scheme in ("", "fifo"):
        return StdioPlan("fifo", stdio.stdin, url.path if url.scheme else out, stderr)
    if not url.path:
        raise InvalidArgument(f"stdio URI {out!r} has no path")
    path = unquote(url.path)
    if url.scheme == "file":
        return StdioPlan("file", stdio.stdin, path, "")
    if url.scheme == "binary":
        args = tuple(x for kv in parse_qsl(url.query, keep_blank_values=True) for x in kv)
        return StdioPlan("binary", stdio.stdin, path, "", args)
    raise InvalidArgument(f"unknown STDIO scheme {url.scheme!r} in {out!r}")


def _open_fifo_writer(path: str) -> tuple[int, int]:
    """(read keeper, write end) of a FIFO; the reader first, so the writer open cannot block."""
    keeper = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        writer = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(keeper)
        raise
    return keeper, writer


class _Writer:
    """Serialized writes to one fd in a worker thread (FIFOs block when full; so do files)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = asyncio.Lock()

    async def write(self, data: bytes) -> None:
        async with self._lock:
            view = memoryview(data)
            while view:
                n = await asyncio.to_thread(os.write, self.fd, view)
                view = view[n:]


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Reader:
    """The stdin FIFO: opened (blocking) in a thread when first needed, then read non-blocking.

    ``request_close()`` (CloseIO: the client reached EOF) makes ``read`` return what is already
    buffered and then b"", without waiting for the writer to go away.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self._open_task: asyncio.Task[int] | None = None
        self._close_requested = asyncio.Event()

    def start_open(self) -> None:
        if self._open_task is None:
            self._open_task = asyncio.create_task(
                asyncio.to_thread(os.open, self.path, os.O_RDONLY | os.O_CLOEXEC), name="stdin-open"
            )

    def request_close(self) -> None:
        self._close_requested.set()

    async def read(self) -> bytes:
        """Up to READ_CHUNK bytes; b"" at EOF or after ``request_close`` once the buffer is empty."""
        self.start_open()
        assert self._open_task is not None
        if self.fd is None:
            closing = asyncio.ensure_future(self._close_requested.wait())
            try:
                await asyncio.wait({self._open_task, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
            if not self._open_task.done():
                return b""  # closed before the client ever opened its end
            self.fd = self._open_task.result()
            os.set_blocking(self.fd, False)
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                if self._close_requested.is_set():
                    return b""
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _set_once, readable)
            closing = asyncio.ensure_future(self._close_requested.wait())
            try:
                await asyncio.wait({readable, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(self.fd)
                closing.cancel()

    async def close(self) -> None:
        if self._open_task is not None:
            # The thread stays blocked in open() until a writer appears: be that writer. Retry,
            # because the thread may not have entered open() yet (then there is no reader and our
            # non-blocking open fails with ENXIO).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while not self._open_task.done():
                        with contextlib.suppress(OSError):
                            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                        await asyncio.sleep(0.01)
            if self._open_task.done() and self.fd is None:
                with contextlib.suppress(BaseException):
                    os.close(self._open_task.result())
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class HostIO:
    """Opened host ends for one process. Use ``await open_host_io(...)``; finish with ``close()``.

    State: only touched from the event loop; each writer serializes its own writes.
    """

    def __init__(self, stdio_plan: StdioPlan) -> None:
        self.plan = stdio_plan
        self.stdout: _Writer | None = None
        self.stderr: _Writer | None = None
        self.stdin: _Reader | None = _Reader(stdio_plan.stdin) if stdio_plan.stdin else None
        self._fds: list[int] = []
        self._logger: asyncio.subprocess.Process | None = None

    async def _open_outputs(self, container_id: str, namespace: str) -> None:
        p = self.plan
        if p.kind == "fifo":
            for path, attr in ((p.stdout, "stdout"), (p.stderr, "stderr")):
                if path:
                    keeper, writer = await asyncio.to_thread(_open_fifo_writer, path)
                    self._fds += [keeper, writer]
                    setattr(self, attr, _Writer(writer))
        elif p.kind == "file":
            os.makedirs(os.path.dirname(p.stdout) or ".", exist_ok=True)
            fd = os.open(p.stdout, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._fds.append(fd)
            self.stdout = self.stderr = _Writer(fd)
        elif p.kind == "binary":
            await self._start_logger(container_id, namespace)

    async def _start_logger(self, container_id: str, namespace: str) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        child_fds = {3: out_r, 4: err_r, 5: ready_w}

        def arrange() -> None:  # in the child, before exec: put the pipe ends on fds 3, 4, 5
            tmp = [os.dup(fd) for fd in child_fds.values()]
            for target, fd in zip(child_fds, tmp, strict=True):
                os.dup2(fd, target)

        try:
            self._logger = await asyncio.create_subprocess_exec(
                self.plan.stdout,
                *self.plan.args,
                env={"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=arrange,
                pass_fds=(3, 4, 5),
                start_new_session=True,
            )
        finally:
            for fd in (out_r, err_r, ready_w):
                os.close(fd)
        self._fds += [out_w, err_w]
        self.stdout, self.stderr = _Writer(out_w), _Writer(err_w)
        # binary://: ready when the logger writes a byte or closes fd 5 (EOF)
        try:
            await asyncio.to_thread(os.read, ready_r, 1)
        finally:
            os.close(ready_r)

    async def close(self) -> None:
        """Flush what was accepted, then close every end and stop the logger. Idempotent."""
        for w in {id(w): w for w in (self.stdout, self.stderr) if w is not None}.values():
            async with w._lock:  # wait for in-flight writes: drain before exit
                pass
        if self.stdin is not None:
            await self.stdin.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.stdout = self.stderr = None
        if self._logger is not None:
            logger, self._logger = self._logger, None
            if logger.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    logger.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(LOGGER_STOP_TIMEOUT):
                    await logger.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    logger.kill()
                await logger.wait()


async def open_host_io(stdio: Stdio, *, container_id: str, namespace: str) -> HostIO:
    """Open stdout/stderr now (a FIFO's reader must exist: containerd opens it before Create);
    stdin opens in the background when first read.

    :raises InvalidArgument: unknown scheme. :raises OSError: a path cannot be opened, or the binary
        logger could not be started.
    """
    io = HostIO(plan(stdio))
    try:
        await io._open_outputs(container_id, namespace)
    except BaseException:
        await io.close()
        raise
    if io.stdin is not None:
        io.stdin.start_open()
    return io


__all__ = ["HostIO", "StdioPlan", "open_host_io", "plan"]
