"""Host probes that need no VM."""

from __future__ import annotations

from pathlib import Path

from shim.platform.host import Level, check_cgroup2, check_dev_kvm, check_file, check_qemu


def test_check_file(tmp_path: Path) -> None:
    f = tmp_path / "code.fd"
    f.write_bytes(b"x")
    assert check_file("firmware", "hypervisor.pflashes[0]", f).level is Level.OK
    miss = check_file("firmware", "hypervisor.pflashes[0]", tmp_path / "nope", hint="install ovmf")
    assert (
        miss.level is Level.FAIL and "hypervisor.pflashes[0]" in miss.detail and "install ovmf" in miss.detail
    )
    assert check_file("floor", "x", tmp_path / "nope", required=False).level is Level.WARN


def test_check_qemu_missing(tmp_path: Path) -> None:
    f = check_qemu(tmp_path / "qemu-system-x86_64")
    assert f.level is Level.FAIL and "hypervisor.path" in f.detail


def test_check_qemu_version(tmp_path: Path) -> None:
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 6.2.0 (Debian)'\n")
    fake.chmod(0o755)
    f = check_qemu(fake)
    assert f.level is Level.FAIL and "older than 7.0" in f.detail


def test_cgroups(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids io\n")
    assert check_cgroup2(tmp_path).level is Level.OK
    v1 = tmp_path / "v1"
    (v1 / "unified").mkdir(parents=True)
    (v1 / "unified" / "cgroup.controllers").write_text("")
    f = check_cgroup2(v1)
    assert f.level is Level.WARN and "hybrid" in f.detail


def test_dev_kvm_absent(tmp_path: Path) -> None:
    assert check_dev_kvm(tmp_path / "kvm").level is Level.WARN
