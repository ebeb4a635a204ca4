"""Regression: with a long run root, CRI's 64-character sandbox ids pushed ``virtiofsd.sock`` past
the 108-byte ``sun_path``; virtiofsd died "Socket path too long" and Create failed obscurely. The
VM sandbox now refuses before anything is probed or spawned, naming the path, its length and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shim.errors import FailedPrecondition
from shim.paths import SandboxDir
from shim.sandbox import vm as vm_mod
from shim.sandbox.vm import VmSandbox


async def test_long_run_root_is_refused_before_anything_is_spawned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("reached the accelerator probe / QEMU")

    monkeypatch.setattr(vm_mod.accel, "get_verdict", must_not_run)
    monkeypatch.setattr(vm_mod, "QemuVM", must_not_run)
    sid = "f" * 64
    base = tmp_path / ("long" * 10) / "sbs"
    sb = VmSandbox(sid, sdir=SandboxDir.for_sandbox(sid, base=base))
    cfg = tmp_path / "pyvm.toml"
    cfg.write_text("")
    with pytest.raises(FailedPrecondition, match=r"\.sock is \d+ bytes, longer than .* 107"):
        await sb._ensure_vm(str(cfg), {})
    assert not sb.sdir.root.exists()
