"""A process's standard streams inside the guest: pipes (or a pty master) read into bounded buffers
that the host drains with ReadStdout/ReadStderr, and a stdin writer fed by WriteStdin.

Order and completeness: one reader callback per fd appends to one buffer, readers take from its
front, so bytes come out exactly as the process wrote them; EOF is reported only once the buffer is
empty. When the buffer holds ``HIGH_WATER`` bytes the fd is no longer read, so a host that stops
reading blocks the process instead of growing the agent.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import socket
import struct
import termios
from pathlib import Path

from shim.errors import FailedPrecondition

HIGH_WATER = 4 * 1024 * 1024
READ_SIZE = 256 * 1024
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 1024 * 1024


class OutputStream:
    """Reads ``fd`` (owned: closed at EOF) into a buffer. Owned by the event loop thread."""

    def __init__(self, fd: int | None, name: str) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._buf = bytearray()
        self._eof = fd is None
        self._changed = asyncio.Event()
        self._eof_event = asyncio.Event()
        self._reading = False
        if fd is None:
            self._eof_event.set()
        else:
            os.set_blocking(fd, False)
            self._resume()

    @property
    def at_eof(self) -> bool:
        """The fd reached EOF (buffered data may remain)."""
        return self._eof

    async def wait_eof(self) -> None:
        await self._eof_event.wait()

    async def read(self, max_bytes: int) -> tuple[bytes, bool]:
        """Up to ``max_bytes`` (non-empty), or ``(b"", True)`` once drained after EOF. Blocks until
        one of those. Cancellation-safe: nothing is taken from the buffer before returning.
        """
        n = min(max_bytes or DEFAULT_CHUNK, MAX_CHUNK)
        while True:
            if self._buf:
                data = bytes(self._buf[:n])
                del self._buf[:n]
                if not self._reading and not self._eof and len(self._buf) < HIGH_WATER:
                    self._resume()
                return data, False
            if self._eof:
                return b"", True
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        """Stop reading and drop the fd; pending and later reads see EOF after buffered data."""
        self._finish()

    def _resume(self) -> None:
        assert self._fd is not None
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EIO: the pty's last slave fd closed, which is EOF for a terminal; anything else
            # leaves nothing more to read either
            chunk = b""
        if not chunk:
            self._finish()
            return
        self._buf.extend(chunk)
        if len(self._buf) >= HIGH_WATER:
            self._loop.remove_reader(self._fd)
            self._reading = False
        self._changed.set()

    def _finish(self) -> None:
        if self._fd is not None:
            if self._reading:
                self._loop.remove_reader(self._fd)
                self._reading = False
            os.close(self._fd)
            self._fd = None
        self._eof = True
        self._eof_event.set()
        self._changed.set()


class StdinWriter:
    """Writes host data to the process's stdin fd (owned). Writes are serialized."""

    def __init__(self, fd: int | None, *, is_pty: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._is_pty = is_pty
        self._lock = asyncio.Lock()
        if fd is not None:
            os.set_blocking(fd, False)

    async def write(self, data: bytes) -> int:
        """Write all of ``data``; raise ``FailedPrecondition`` if stdin is closed or the process
        stopped reading it for good (EPIPE).
        """
        async with self._lock:
            if self._fd is None:
                raise FailedPrecondition("stdin is closed")
            view = memoryview(data)
            written = 0
            while written < len(view):
                try:
                    written += os.write(self._fd, view[written:])
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except BrokenPipeError as exc:
                    raise FailedPrecondition("the process closed its stdin", written=written) from exc
                except OSError as exc:
                    raise FailedPrecondition(f"cannot write stdin: {exc}", written=written) from exc
                await self._writable()
            return written

    async def _writable(self) -> None:
        fd = self._fd
        assert fd is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(fd, _set_once, fut)
        try:
            await fut
        finally:
            self._loop.remove_writer(fd)

    async def close(self) -> None:
        """Close stdin after pending writes. For a terminal the pty stays open (it is also the
        output side); the process sees nothing, as with runc's CloseIO on a console.
        """
        async with self._lock:
            if self._fd is not None and not self._is_pty:
                os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None and not self._is_pty:
            os.close(self._fd)
        self._fd = None


def set_winsize(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


class ConsoleSocket:
    """A listening unix socket for crun's ``--console-socket``: crun sends the pty master over it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive_master(self, timeout: float = 120.0) -> int:  # noqa: ASYNC109
        """The pty master fd crun sent. Raises ``FailedPrecondition`` if none arrives."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                conn, _ = await loop.sock_accept(self._sock)
                with conn:
                    fds = array.array("i")
                    while True:
                        await _readable(loop, conn)
                        try:
                            _msg, anc, _flags, _addr = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize * 4))
                        except BlockingIOError:
                            continue
                        for level, typ, data in anc:
                            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                        break
        except TimeoutError as exc:
            raise FailedPrecondition("crun sent no terminal over the console socket") from exc
        if not fds:
            raise FailedPrecondition("crun closed the console socket without sending a terminal")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), _set_once, fut)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())
