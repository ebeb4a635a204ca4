"""Host stdio ends (``shim.sandbox.hostio``): containerd's FIFO open rules, file:// and binary:// URIs,
terminal, drain."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.sandbox.hostio import open_host_io
from shim.sandbox.spec import Stdio


async def test_unknown_scheme_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown STDIO scheme"):
        await open_host_io(Stdio(stdout="http://x/y"), container_id="c", namespace="n")


def _fifo(tmp: Path, name: str) -> str:
    p = tmp / name
    os.mkfifo(p)
    return str(p)


async def test_fifo_stdout_written_drained_and_no_epipe_when_client_leaves(tmp_path: Path) -> None:
    out = _fifo(tmp_path, "out")
    client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # containerd's reader exists before Create
    io = await open_host_io(Stdio(stdout=out), container_id="c1", namespace="ns")
    assert io.stdin is None and io.stderr is None and io.stdout is not None
    await io.stdout.write(b"hello\n")
    assert os.read(client, 100) == b"hello\n"
    os.close(client)  # the client goes away: our own read handle keeps writes from EPIPE
    await io.stdout.write(b"nobody listens\n")
    await io.close()


async def test_fifo_stdin_opens_when_client_does_and_reads_to_eof(tmp_path: Path) -> None:
    path = _fifo(tmp_path, "in")
    io = await open_host_io(Stdio(stdin=path), container_id="c1", namespace="ns")
    assert io.stdin is not None

    def client() -> None:
        time.sleep(0.3)  # the client opens its end only after our first read began (the lost-stdin race)
        fd = os.open(path, os.O_WRONLY)  # blocks until our reader opened: proves the open is real
        os.write(fd, b"input")
        os.close(fd)

    writer = asyncio.create_task(asyncio.to_thread(client))
    data = b""
    while chunk := await asyncio.wait_for(io.stdin.read(), 5):
        data += chunk
    assert data == b"input"
    await writer
    await io.close()


async def test_stdin_close_requested_before_client_opened_does_not_hang(tmp_path: Path) -> None:
    path = _fifo(tmp_path, "in")
    io = await open_host_io(Stdio(stdin=path), container_id="c1", namespace="ns")
    assert io.stdin is not None
    io.stdin.request_close()
    assert await asyncio.wait_for(io.stdin.read(), 5) == b""
    await asyncio.wait_for(io.close(), 5)


async def test_terminal_ignores_stderr_path(tmp_path: Path) -> None:
    out = _fifo(tmp_path, "out")
    never = str(tmp_path / "nobody-reads-this")  # opening it would block forever
    client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    io = await asyncio.wait_for(
        open_host_io(Stdio(stdout=out, stderr=never, terminal=True), container_id="c", namespace="n"), 5
    )
    assert io.stderr is None
    await io.close()
    os.close(client)


async def test_file_uri_shares_one_file(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "c.log"
    uri = f"file://{log}"
    io = await open_host_io(Stdio(stdout=uri, stderr=uri), container_id="c", namespace="n")
    assert io.stdout is not None and io.stderr is not None
    await io.stdout.write(b"out\n")
    await io.stderr.write(b"err\n")
    await io.close()
    assert log.read_bytes() == b"out\nerr\n"


async def test_binary_logger_protocol(tmp_path: Path) -> None:
    result = tmp_path / "result"
    logger = tmp_path / "logger"
    logger.write_text(
        f"""#!{sys.executable}
import os, signal, sys
args = sys.argv[1:]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drain first, like a real logger
os.close(5)  # ready: EOF on the ready pipe
out = os.fdopen(3, "rb").read()
err = os.fdopen(4, "rb").read()
with open({str(result)!r}, "w") as f:
    f.write(repr((args, os.environ.get("CONTAINER_ID"), os.environ.get("CONTAINER_NAMESPACE"), out, err)))
"""
    )
    logger.chmod(logger.stat().st_mode | stat.S_IXUSR)
    uri = f"binary://{logger}?k=v"
    io = await open_host_io(Stdio(stdout=uri, stderr=uri), container_id="c7", namespace="ns7")
    assert io.stdout is not None and io.stderr is not None
    await io.stdout.write(b"to-out")
    await io.stderr.write(b"to-err")
    await asyncio.wait_for(io.close(), 15)
    assert eval(result.read_text()) == (["k", "v"], "c7", "ns7", b"to-out", b"to-err")
