"""Regression: a ``binary://`` logger that died (or a ``file://`` sink that fails) stopped the
output relay with BrokenPipeError; the agent's buffer was then never drained, the process blocked
on its stdout and the container never exited (``ctr run`` hung). The relay now keeps reading the
stream to its EOF and discards what it cannot write.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from shim.paths import SandboxDir
from shim.sandbox.hostio import HostIO, OutputSink
from shim.sandbox.spec import Stdio
from shim.sandbox.vm import VmSandbox, _Container, _Proc

CHUNKS = 50


class _Agent:
    """Serves CHUNKS chunks of 64 KiB on stdout, then EOF; counts what was read."""

    def __init__(self) -> None:
        self.read = 0

    async def read_stdout(self, container_id: str, exec_id: str) -> Any:
        await asyncio.sleep(0)
        if self.read == CHUNKS:
            return SimpleNamespace(data=b"", eof=True)
        self.read += 1
        return SimpleNamespace(data=b"x" * 65536, eof=False)


async def test_relay_drains_to_eof_when_the_sink_is_broken(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # the logger is gone: writes fail with EPIPE (Python ignores SIGPIPE)
    sb = VmSandbox("sb1", sdir=SandboxDir.for_sandbox("sb1", tmp_path))
    agent = _Agent()
    sb.agent = agent  # type: ignore[assignment]
    io = HostIO(stdout=OutputSink(w, "stdout"))
    p = _Proc("c1", "", Stdio(stdout="binary:///x"), io)
    sb._containers["c1"] = _Container("c1", str(tmp_path), procs={"": p})
    try:
        async with asyncio.timeout(10):
            await sb._relay_out(p, "stdout")  # returns (at EOF) instead of raising
        assert agent.read == CHUNKS
    finally:
        await io.close()
