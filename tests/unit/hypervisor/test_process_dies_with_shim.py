"""Regression: a SIGKILLed shim left QEMU and virtiofsd running (seen as orphaned VMs after tests)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from shim.hypervisor.qemu.process import spawn

    async def main():
        child = await spawn("sleeper", ["sleep", "300"], Path(sys.argv[1]))
        print(child.proc.pid, flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_spawned_children_die_when_the_shim_is_killed(tmp_path: Path) -> None:
    shim = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "log")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert shim.stdout is not None
        line = shim.stdout.readline()
        while not line.strip().isdigit():  # structlog's default logger also writes to stdout
            assert line, "the fake shim exited before spawning"
            line = shim.stdout.readline()
        grandchild = int(line)
        assert _alive(grandchild)
        os.kill(shim.pid, signal.SIGKILL)
        shim.wait()
        deadline = time.monotonic() + 5
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild), "the spawned process outlived its shim"
    finally:
        shim.kill()
        shim.wait()
