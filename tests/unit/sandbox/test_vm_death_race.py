"""Regression: QEMU SIGKILLed under running containers was reported as exit 255 ("lost track"),
not 137. The agent channel (QEMU's chardev socket) closes a moment before QEMU's exit is reaped,
so ``wait`` saw ``Unavailable`` while the VM was not yet known dead. ``VmSandbox.wait`` now gives
the exit watcher a short grace period to confirm the death.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shim.errors import Unavailable
from shim.hypervisor.qemu.driver import ExitInfo
from shim.paths import SandboxDir
from shim.sandbox import vm as vm_mod
from shim.sandbox.spec import Stdio
from shim.sandbox.vm import VM_DIED_STATUS, VmSandbox, _Container, _Proc


class _NoIO:
    async def close(self) -> None:
        return None


class _BrokenAgent:
    """An agent whose channel breaks while a process is being waited for."""

    async def wait_process(self, container_id: str, exec_id: str) -> Any:
        await asyncio.sleep(0.01)
        raise Unavailable("agent connection closed")


def _sandbox(tmp_path: Path) -> VmSandbox:
    sb = VmSandbox("sb1", sdir=SandboxDir.for_sandbox("sb1", tmp_path))
    sb.agent = _BrokenAgent()  # type: ignore[assignment]
    c = _Container("c1", str(tmp_path))
    c.procs[""] = _Proc("c1", "", Stdio(), _NoIO())  # type: ignore[arg-type]
    sb._containers["c1"] = c
    return sb


async def test_vm_death_confirmed_after_the_agent_channel_broke_is_137(tmp_path: Path) -> None:
    sb = _sandbox(tmp_path)
    loop = asyncio.get_running_loop()
    # QEMU's exit is reaped 50 ms after the agent channel broke
    loop.call_later(0.06, sb._vm_exited, ExitInfo(None, "killed by SIGKILL", unexpected=True))
    exit = await sb.wait("c1", "")
    assert exit.status == VM_DIED_STATUS


async def test_agent_lost_while_the_vm_lives_still_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vm_mod, "VM_DEATH_GRACE_S", 0.05)
    sb = _sandbox(tmp_path)
    with pytest.raises(Unavailable):
        await sb.wait("c1", "")
