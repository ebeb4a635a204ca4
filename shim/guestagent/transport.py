"""Where the agent listens: the virtio-serial port (the guest) or a unix socket (tests on a host).

virtio-serial facts this code rests on (notes/qemu-on-this-host.md section 4): a port is found by
name under /sys/class/virtio-ports and can be opened only once (EBUSY); a read while no host is
connected returns EOF at once and ``poll`` reports POLLHUP; a write while no host is connected
blocks; after the host disconnects, nothing answers until the guest closes and reopens the port.
So the loop is: open, wait for a host, serve until EOF, close, reopen — forever.

The port stays open while the agent waits for a host: closing it discards whatever a host sent in
the meantime. (An open-check-close loop lost the first Health call whenever the host connected
between the check and the close; a VM template saved at that moment lost it on every restore.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from shim.log import get_logger
from shim.ttrpc import MAX_MESSAGE_SIZE, Server

log = get_logger(__name__)

VIRTIO_PORTS = Path("/sys/class/virtio-ports")
AGENT_PORT_NAME = "io.pyvm.agent.0"
LOG_PORT_NAME = "io.pyvm.log.0"
READ_LIMIT = MAX_MESSAGE_SIZE + 64 * 1024
_BACKOFF_MIN = 0.01
_BACKOFF_MAX = 0.2


def find_port(name: str, sysfs: Path = VIRTIO_PORTS, dev: Path = Path("/dev")) -> Path | None:
    """The device node of the virtio-serial port called ``name`` (made if devtmpfs lacks it)."""
    try:
        entries = sorted(sysfs.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() != name:
                continue
        except OSError:
            continue
        node = dev / entry.name
        if not node.exists():
            with contextlib.suppress(OSError, ValueError):
                major, minor = (int(x) for x in (entry / "dev").read_text().strip().split(":"))
                os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
        return node
    return None


def _host_connected(fd: int) -> bool:
    """False while the port has no host on the other side (POLLHUP).

    Data alone does not count: the host's first bytes (data queue) can reach the guest before the
    "host connected" message (control queue). Served that early, the next read saw EOF (no host
    yet), the agent closed the port, and the answer to that first request was lost.
    """
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    return not any(ev & select.POLLHUP for _fd, ev in p.poll(0))


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    """Flow control for a write-only pipe transport, with the close waiter StreamWriter needs."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


class _ReadProtocol(asyncio.StreamReaderProtocol):
    """At EOF from the host, abort the write side: a host that left reads nothing more, and a
    virtio-serial write with no host blocks forever, which would wedge the connection teardown.
    """

    def __init__(self, reader: asyncio.StreamReader, on_eof: Callable[[], None]) -> None:
        super().__init__(reader)
        self._on_eof = on_eof

    def eof_received(self) -> bool:
        self._on_eof()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof()
        super().connection_lost(exc)


async def streams_for_fd(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Reader and writer over one read-write fd (a character device). Takes ownership of ``fd``."""
    loop = asyncio.get_running_loop()
    wfd = os.dup(fd)
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    holder: list[asyncio.BaseTransport] = []

    def abort_writer() -> None:
        if holder and not holder[0].is_closing():
            holder[0].abort()  # type: ignore[attr-defined]

    try:
        _rt, _rproto = await loop.connect_read_pipe(
            lambda: _ReadProtocol(reader, abort_writer), os.fdopen(fd, "rb", buffering=0)
        )
    except BaseException:
        os.close(wfd)
        raise
    wt, wproto = await loop.connect_write_pipe(_WriteProtocol, os.fdopen(wfd, "wb", buffering=0))
    holder.append(wt)
    writer = asyncio.StreamWriter(wt, wproto, reader, loop)
    return reader, writer


async def serve_port(server: Server, path: Path | None, port_name: str = AGENT_PORT_NAME) -> None:
    """Serve ttrpc on the virtio-serial port forever (``path``: the device, else found by name).

    A unix socket ``path`` stands in for the port in tests: the agent connects to it as the guest
    side of a QEMU chardev would be connected, and reconnects after EOF. Never returns normally.
    """
    backoff = _BACKOFF_MIN
    waiting_logged = False
    while True:
        dev = path or find_port(port_name)
        try:
            if dev is None:
                raise FileNotFoundError(f"no virtio-serial port named {port_name}")
            reader, writer, what = await _open(dev)
        except OSError as exc:
            if not waiting_logged:
                log.info("waiting for the host", port=str(dev or port_name), reason=str(exc))
                waiting_logged = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            continue
        backoff = _BACKOFF_MIN
        waiting_logged = False
        log.info("host connected", port=str(dev), kind=what)
        try:
            await server.serve_stream(reader, writer)
        finally:
            # the pipe transport may have closed itself already (EOF/EPIPE); aborting a closed one
            # raises AttributeError in 3.11 (its loop is gone), which killed the agent on a host
            # disconnect, e.g. in every VM restored from a template saved right after one
            if not writer.transport.is_closing():
                writer.transport.abort()
        log.info("host disconnected", port=str(dev))


async def _open(dev: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Open ``dev`` and wait, holding it open, until a host is there (a unix socket: connect to it;
    ``ConnectionRefusedError`` if nobody listens yet)."""
    if stat.S_ISSOCK(os.stat(dev).st_mode):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(dev))
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_LIMIT)
        except BaseException:
            sock.close()
            raise
        return reader, writer, "unix socket"
    fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        delay = _BACKOFF_MIN
        while not _host_connected(fd):
            # keep the port open: a host's first request is then queued for us, not thrown away
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)
    except BaseException:
        os.close(fd)
        raise
    reader, writer = await streams_for_fd(fd)  # owns fd from here
    return reader, writer, "virtio-serial"


class LogPort:
    """Best-effort copy of the log lines to the ``io.pyvm.log.0`` port: never blocks, drops lines
    while no host reads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._buf = b""

    def write(self, text: str) -> None:
        self._buf += text.encode(errors="replace")
        if b"\n" not in self._buf:
            return
        lines, _, self._buf = self._buf.rpartition(b"\n")
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError:
                return
        try:
            os.write(self._fd, lines + b"\n")
        except BlockingIOError:
            pass
        except OSError:
            os.close(self._fd)
            self._fd = None

    def flush(self) -> None:
        pass


class Tee:
    """A text stream writing to several others; what structlog prints to."""

    def __init__(self, *streams: object) -> None:
        self._streams = streams

    def write(self, text: str) -> int:
        for s in self._streams:
            with contextlib.suppress(Exception):
                s.write(text)  # type: ignore[attr-defined]
        return len(text)

    def flush(self) -> None:
        for s in self._streams:
            with contextlib.suppress(Exception):
                s.flush()  # type: ignore[attr-defined]
