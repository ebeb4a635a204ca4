"""A failed VM's logs outlive the sandbox directory: ``keep_logs`` copies them next to ``sbs/``."""

from __future__ import annotations

import os
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
    assert kept == tmp_path / "run" / "postmortem" / "sb1" == sd.postmortem
    assert (kept / "console.log").read_bytes() == b"xKernel panic!!\n"  # the last 16 bytes
    assert (kept / "guest.log").read_text() == '{"e": 1}\n'  # shorter: whole
    assert not (kept / "qemu.log").exists()  # there was none
    assert not str(kept).startswith(str(sd.root))  # the sandbox cleanup does not take it


def test_keep_logs_without_logs_keeps_nothing(tmp_path: Path) -> None:
    sd = SandboxDir.for_sandbox("sb2", base=tmp_path / "sbs")
    assert driver.keep_logs(sd) is None
    assert not sd.postmortem.exists()


def test_keep_logs_keeps_only_the_newest_sandboxes(tmp_path: Path) -> None:
    """Bounded: a node whose VMs keep failing must not fill its tmpfs with post-mortems."""
    base = tmp_path / "run" / "sbs"
    for i in range(5):  # older failures, oldest first
        old = SandboxDir.for_sandbox(f"old{i}", base=base).postmortem
        old.mkdir(parents=True)
        (old / "console.log").write_text("x")
        os.utime(old, (1000 + i, 1000 + i))
    sd = SandboxDir.for_sandbox("new", base=base)
    sd.root.mkdir(parents=True)
    sd.console_log.write_text("panic")
    kept = driver.keep_logs(sd, keep=3)
    assert kept == sd.postmortem
    assert sorted(p.name for p in sd.postmortem_root.iterdir()) == ["new", "old3", "old4"]


def test_a_second_failure_of_the_same_id_counts_as_newest(tmp_path: Path) -> None:
    base = tmp_path / "sbs"
    sd = SandboxDir.for_sandbox("again", base=base)
    sd.root.mkdir(parents=True)
    sd.console_log.write_text("1")
    driver.keep_logs(sd)
    os.utime(sd.postmortem, (1, 1))  # as if long ago
    other = SandboxDir.for_sandbox("other", base=base).postmortem
    other.mkdir()
    os.utime(other, (2, 2))
    sd.console_log.write_text("2")
    driver.keep_logs(sd, keep=1)
    assert [p.name for p in sd.postmortem_root.iterdir()] == ["again"]
    assert (sd.postmortem / "console.log").read_text() == "2"


def test_prune_postmortems_without_a_root_is_a_no_op(tmp_path: Path) -> None:
    assert driver.prune_postmortems(tmp_path / "missing", 20) == []
    assert driver.paths.POSTMORTEM_KEEP == 20
