"""Accelerator verdicts: resolve() rules, speed factor, cache, the probe's argv. No VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import FailedPrecondition
from shim.platform import accel
from shim.platform.accel import AccelVerdict, ProbeTarget

TCG = AccelVerdict("tcg", False, "guest did not boot within 6 s under -accel kvm (hang)", 5.0, 4.0, "k", 1.0)
KVM = AccelVerdict("kvm", True, "ok", 1.0, 0.5, "k", 1.0)


def test_auto_follows_the_probe_and_says_why() -> None:
    v = accel.resolve("auto", TCG)
    assert v.accel == "tcg" and v.degraded
    assert "KVM unusable" in v.reason and "hang" in v.reason
    assert accel.resolve("auto", KVM).accel == "kvm" and not KVM.degraded


def test_kvm_demanded_but_broken_fails_fast_naming_the_probe_result() -> None:
    with pytest.raises(FailedPrecondition, match=r'accelerator = "kvm".*hang'):
        accel.resolve("kvm", TCG)
    assert accel.resolve("kvm", KVM) == KVM


def test_forced_tcg_on_a_kvm_host_gets_a_conservative_factor() -> None:
    v = accel.resolve("tcg", KVM)
    assert v.accel == "tcg" and v.speed_factor >= 6.0


def test_factor_is_clamped() -> None:
    assert accel._factor(0.1) == 1.0
    assert accel._factor(4.0) == pytest.approx(4.0 / accel.FLOOR_REFERENCE_S)
    assert accel._factor(1000) == 20.0


def test_floor_argv() -> None:
    t = ProbeTarget(Path("/q"), "aarch64", Path("/k"), Path("/f"), "host", "max,pauth-impdef=on")
    argv = accel.floor_argv(t, "tcg")
    assert argv[:7] == [
        "/q",
        "-machine",
        "virt,gic-version=3",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max,pauth-impdef=on",
    ]
    assert argv[-1] == "console=ttyAMA0 panic=-1 quiet pyvm.floor=poweroff"
    t86 = ProbeTarget(Path("/q"), "x86_64", Path("/k"), None)
    argv = accel.floor_argv(t86, "kvm")
    assert "-initrd" not in argv and argv[-1] == "console=ttyS0 panic=-1 quiet"
    assert argv[argv.index("-cpu") + 1] == "host"


def test_cache_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVM_CACHE_ROOT", str(tmp_path))
    monkeypatch.setattr(accel, "cache_key", lambda t: "key1")
    t = ProbeTarget(Path("/q"), "x86_64", Path("/k"), None)
    assert accel.load_cached(t) is None
    v = AccelVerdict("tcg", False, "x", 4.0, 3.2, "key1", 1.0)
    accel._store(v)
    assert accel.load_cached(t) == v
    (tmp_path / "accel.json").write_text("garbage")
    assert accel.load_cached(t) is None


async def test_get_verdict_probes_once_then_uses_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYVM_CACHE_ROOT", str(tmp_path))
    monkeypatch.setattr(accel, "cache_key", lambda t: "key2")
    calls = []

    async def fake_probe(t: ProbeTarget) -> AccelVerdict:
        calls.append(t)
        return AccelVerdict("tcg", False, "x", 4.0, 3.2, "key2", 1.0)

    monkeypatch.setattr(accel, "probe", fake_probe)
    t = ProbeTarget(Path("/q"), "x86_64", Path("/k"), None)
    a = await accel.get_verdict(t)
    b = await accel.get_verdict(t)
    assert a == b and len(calls) == 1
    await accel.get_verdict(t, refresh=True)
    assert len(calls) == 2


def test_cache_key_follows_kernel_content_not_mtime(tmp_path, monkeypatch):
    """Regression: every guest rebuild (same kernel, new mtime) used to force a new KVM probe."""
    import os
    from types import SimpleNamespace

    monkeypatch.setattr(accel, "qemu_info", lambda path: SimpleNamespace(version="7.2.22"))

    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel-1" * 1000)
    t = accel.ProbeTarget(qemu=Path("/bin/true"), arch="x86_64", kernel=k, floor_initrd=k)
    first = accel.cache_key(t)
    os.utime(k, ns=(1, 1))
    assert accel.cache_key(t) == first
    k.write_bytes(b"kernel-2" * 1000)
    assert accel.cache_key(t) != first
