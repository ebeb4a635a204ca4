"""A failed VM's logs outlive the sandbox directory: ``keep_logs`` copies them next to ``sbs/``."""

from __future__ import annotations

from pathlib import Path

from shim.hypervisor.qemu import driver
from shim.paths import SandboxDir


def test_keep_logs_copies_the_tail_of_each_log_outside_the_sandbox_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(driver, "POSTMORTEM_MAX_BYTES", 16)
    sd = SandboxDir.for_sandbox("sb1", base=tmp_path / "run" / "sbs")
    sd.root.mkdir(parents=True)
    sd.console_log.write_bytes(b"x" * 100 + b"Kernel panic!!\n")
    sd.guest_log.write_text('{"e": 1}\n')
    kept = driver.keep_logs(sd)
    assert kept == tmp_path / "run" / "postmortem" / "sb1" == driver.postmortem_dir(sd)
    assert (kept / "console.log").read_bytes() == b"xKernel panic!!\n"  # the last 16 bytes
    assert (kept / "guest.log").read_text() == '{"e": 1}\n'  # shorter: whole
    assert not (kept / "qemu.log").exists()  # there was none
    assert not str(kept).startswith(str(sd.root))  # the sandbox cleanup does not take it


def test_keep_logs_without_logs_keeps_nothing(tmp_path: Path) -> None:
    sd = SandboxDir.for_sandbox("sb2", base=tmp_path / "sbs")
    assert driver.keep_logs(sd) is None
    assert not driver.postmortem_dir(sd).exists()
