"""Host side of a process's standard streams for the VM sandbox: containerd's FIFOs, ``file://`` and
``binary://`` URIs, all driven by the event loop (no thread ever blocks on a FIFO).

Rules (containerd ``pkg/process/io.go``, see notes/containerd-shim-protocol.md section 5):

- the scheme of **stdout** decides: none/``fifo`` = FIFO paths, ``file`` = one file for stdout and
  stderr (append), ``binary`` = a logger process fed on fds 3/4 (ready on fd 5); else InvalidArgument;
- a stdout/stderr FIFO is opened O_RDONLY first, then O_WRONLY (cannot block then), and both are
  kept, so a client that goes away never makes a write fail with EPIPE;
- a stdin FIFO is opened O_RDONLY|O_NONBLOCK and watched with the event loop: Linux reports it
  readable only once a writer came, and EOF once the last writer closed. Unlike a blocking open in
  a worker thread, nothing is left hanging if the client never opens its end;
- with a terminal, stderr is ignored (nobody reads it; opening it could block forever).

Everything is owned by the event loop. ``close`` methods are idempotent; the sandbox closes a
process's ends only after its relays finished (or were cancelled and awaited).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

from shim.errors import InvalidArgument
from shim.log import get_logger
from shim.sandbox.spec import Stdio

log = get_logger(__name__)

#: how long a ``binary://`` logger may take to say it is ready / to exit after SIGTERM
LOGGER_READY_TIMEOUT = 10.0
LOGGER_EXIT_TIMEOUT = 12.0


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class OutputSink:
    """Where one output stream goes: a non-blocking fd we write to (FIFO, file or logger pipe)."""

    def __init__(self, fd: int, what: str, *, extra_fds: tuple[int, ...] = (), owner: bool = True) -> None:
        self.fd = fd
        self.what = what
        self._extra = extra_fds
        self._owner = owner  # False: the fd is shared (file:// stderr) and closed by its owner
        self._closed = False
        os.set_blocking(fd, False)

    async def write(self, data: bytes) -> None:
        """Write all of ``data``, waiting on the loop (not blocking it) while the reader is slow."""
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self.fd, _set_once, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in ((self.fd,) if self._owner else ()) + self._extra:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_available(fd: int, n: int) -> bytes:
    """What is in the FIFO right now, without waiting (b"" if nothing or no writer)."""
    try:
        return os.read(fd, n)
    except BlockingIOError:
        return b""


class StdinSource:
    """A stdin FIFO read through the event loop. ``read`` returns ``b""`` at EOF or once closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = asyncio.Event()

    def request_close(self) -> None:
        """CloseIO: forward what is already in the FIFO, then report EOF."""
        self._closing.set()

    async def read(self, n: int = 64 * 1024) -> bytes:
        """Next chunk of stdin; ``b""`` at EOF.

        Waits for readiness *before* reading: a non-blocking read of a FIFO whose writer has not
        opened yet returns 0 bytes, indistinguishable from EOF, and the client may open its end
        after we do. Linux reports HUP on the FIFO only once a writer has come and gone, so
        readiness means data or a real EOF.
        """
        loop = asyncio.get_running_loop()
        waited = False
        while self.fd is not None:
            fd = self.fd
            if waited:
                try:
                    return os.read(fd, n)
                except BlockingIOError:
                    pass
            if self._closing.is_set():
                return _read_available(fd, n)
            waited = True
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_once, ready)
            closing = asyncio.ensure_future(self._closing.wait())
            either: set[asyncio.Future[Any]] = {ready, closing}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                if self.fd == fd:
                    loop.remove_reader(fd)
        return b""

    def close(self) -> None:
        """Stop reading (a pending ``read`` returns ``b""``) and close the FIFO."""
        self._closing.set()
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class HostIO:
    """The host ends of one process's streams (``None``: stream not used)."""

    stdin: StdinSource | None = None
    stdout: OutputSink | None = None
    stderr: OutputSink | None = None
    logger: SpawnedLogger | None = None

    async def close(self) -> None:
        """Close everything; a ``binary://`` logger gets SIGTERM, then SIGKILL after 12 s."""
        for s in (self.stdin, self.stderr, self.stdout):
            if s is not None:
                s.close()
        proc, self.logger = self.logger, None
        if proc is not None:
            await _stop_logger(proc)


def _open_fifo_writer(path: str, what: str) -> OutputSink:
    try:
        r = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"cannot open {what} FIFO {path}: {exc.strerror}", path=path) from exc
    try:
        w = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        os.close(r)
        raise InvalidArgument(f"cannot open {what} FIFO {path}: {exc.strerror}", path=path) from exc
    return OutputSink(w, what, extra_fds=(r,))


async def open_host_io(stdio: Stdio, *, container_id: str, namespace: str) -> HostIO:
    """Open the host ends named by ``stdio``.

    :raises InvalidArgument: unknown scheme, or a path that cannot be opened (named).
    """
    io = HostIO()
    try:
        url = urlparse(stdio.stdout) if stdio.stdout else None
        scheme = url.scheme if url is not None else ""
        if stdio.stdin:
            try:
                io.stdin = StdinSource(stdio.stdin)
            except OSError as exc:
                raise InvalidArgument(f"cannot open stdin FIFO {stdio.stdin}: {exc.strerror}") from exc
        if url is None or scheme in ("", "fifo"):
            if stdio.stdout:
                io.stdout = _open_fifo_writer(
                    url.path if url is not None and scheme else stdio.stdout, "stdout"
                )
            if stdio.stderr and not stdio.terminal:
                io.stderr = _open_fifo_writer(stdio.stderr, "stderr")
        elif scheme == "file":
            path = unquote(url.path)
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            io.stdout = OutputSink(fd, "stdout")
            if not stdio.terminal:
                io.stderr = OutputSink(fd, "stderr", owner=False)
        elif scheme == "binary":
            await _start_logger(io, unquote(url.path), url.query, container_id, namespace, stdio.terminal)
        else:
            raise InvalidArgument(f"unknown STDIO scheme {scheme!r} in {stdio.stdout!r}")
    except BaseException:
        await io.close()
        raise
    return io


async def _start_logger(
    io: HostIO, path: str, query: str, container_id: str, namespace: str, terminal: bool
) -> None:
    """containerd's binary logger protocol: fds 3/4 = stdout/stderr read ends, 5 = ready pipe."""
    args = [path]
    for k, v in parse_qsl(query, keep_blank_values=True):
        args += [k, v]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child_fds = (out_r, err_r, ready_w)

    # posix_spawn's file actions put the pipe ends on fds 3, 4, 5 without running Python between fork
    # and exec (a preexec_fn is unsafe in a threaded shim: grpcio's fork handlers crash children).
    # The ends are first moved above 9 so that no dup2 overwrites another end.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in child_fds]
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        *((os.POSIX_SPAWN_DUP2, fd, target) for fd, target in zip(high, (3, 4, 5), strict=True)),
    ]
    try:
        pid = os.posix_spawn(  # noqa: ASYNC221 (returns once the child has exec'd, like Popen did)
            path,
            args,
            {"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace},
            file_actions=actions,
            setsid=True,
        )
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
            os.close(fd)
        raise InvalidArgument(f"cannot start the binary logger {path}: {exc.strerror}") from exc
    finally:
        for fd in high:
            os.close(fd)
    proc = SpawnedLogger(pid)
    for fd in child_fds:
        os.close(fd)
    io.logger = proc
    io.stdout = OutputSink(out_w, "stdout")
    io.stderr = OutputSink(err_w, "stderr")
    if terminal:
        io.stderr.close()
        io.stderr = None
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    os.set_blocking(ready_r, False)
    loop.add_reader(ready_r, _set_once, ready)  # a byte or EOF: ready
    try:
        async with asyncio.timeout(LOGGER_READY_TIMEOUT):
            await ready
    except TimeoutError:
        raise InvalidArgument(
            f"binary logger {path} did not become ready in {LOGGER_READY_TIMEOUT}s"
        ) from None
    finally:
        loop.remove_reader(ready_r)
        os.close(ready_r)


class SpawnedLogger:
    """The part of ``subprocess.Popen`` the logger needs, for a child started with ``posix_spawn``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Blocking (call it from a thread). :raises subprocess.TimeoutExpired: still running."""
        deadline = time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return rc


async def _stop_logger(proc: SpawnedLogger) -> None:
    """Our pipe ends are closed: give the logger a moment, SIGTERM it, SIGKILL after 12 s."""
    for sig, wait in ((None, 1.0), (signal.SIGTERM, LOGGER_EXIT_TIMEOUT), (signal.SIGKILL, 5.0)):
        if sig is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            await asyncio.to_thread(proc.wait, wait)  # bounded: the thread cannot hang
            return
        except subprocess.TimeoutExpired:
            continue
    log.warning("binary logger did not exit", pid=proc.pid)


__all__ = ["HostIO", "OutputSink", "StdinSource", "open_host_io"]
