"""VM templates without a VM: the command lines of the three boots, the key, the store, RAM copies."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from shim import config
from shim.errors import InvalidArgument
from shim.hypervisor.qemu import template as store
from shim.hypervisor.qemu.cmdline import NIC_HOTPLUG_PORT, Boot, TapNic, vm_command
from shim.paths import SandboxDir

MiB = 1 << 20


def _cfg(tmp_path: Path, **hv: object) -> config.Config:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    for name in ("qemu", "vmlinuz", "initrd.img", "rootfs.img", "CODE.fd", "VARS.fd"):
        if not (files / name).exists():
            (files / name).write_bytes(name.encode())
    cfg = config.with_overrides(
        config.defaults("x86_64"),
        path=str(files / "qemu"),
        kernel=str(files / "vmlinuz"),
        initrd=str(files / "initrd.img"),
        image=str(files / "rootfs.img"),
        pflashes=[str(files / "CODE.fd"), str(files / "VARS.fd")],
        **hv,
    )
    return dataclasses.replace(cfg, factory=config.FactoryConfig(True, tmp_path / "store"))


def _argv(cfg: config.Config, boot: Boot, sid: str = "pod1") -> list[str]:
    sdir = SandboxDir.for_sandbox(sid, Path("/run/pyvm/sbs"))
    ram = None if boot is Boot.COLD else Path("/proc/self/fd/7")
    return vm_command(cfg, sdir, "tcg", boot=boot, ram_path=ram).argv()


def test_the_three_boots_differ_only_where_they_must(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cold, tmpl, restore = (_argv(cfg, b) for b in (Boot.COLD, Boot.TEMPLATE, Boot.RESTORE))
    assert "vhost-user-fs-pci" in " ".join(cold) and "-incoming" not in cold
    assert "memory-backend-memfd,id=ram0,size=2048M,share=on" in cold
    for argv in (tmpl, restore):
        assert "vhost-user-fs-pci" not in " ".join(argv)  # QEMU 7.2 cannot migrate it: hot-plugged
        assert "pcie-root-port,id=rp-hp0,bus=pcie.0,chassis=1" in argv
        assert "memory-backend-file,id=ram0,size=2048M,mem-path=/proc/self/fd/7,share=on" in argv
    assert restore[-2:] == ["-incoming", "defer"]
    # past its boot, a restored VM needs no kernel, only the option ROM -kernel adds (a RAM block)
    i = tmpl.index("-kernel")
    hv = cfg.hypervisor
    kernel_args = [
        "-kernel",
        str(hv.kernel),
        "-initrd",
        str(hv.initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
    ]
    assert tmpl[i : i + 6] == kernel_args
    assert restore[:-2] == [*tmpl[:i], "-option-rom", "linuxboot_dma.bin", *tmpl[i + 6 :]]


def test_the_pod_nic_is_on_a_cold_command_line_and_hot_plugged_after_a_restore(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    sdir = SandboxDir.for_sandbox("pod1", Path("/run/pyvm/sbs"))
    nic = TapNic(fd=9, mac="0a:58:0a:58:00:05")
    cold = vm_command(cfg, sdir, "tcg", nics=[nic]).argv()
    i = cold.index("-netdev")
    assert cold[i : i + 4] == [
        "-netdev",
        "tap,id=net0,fd=9",
        "-device",
        "virtio-net-pci,netdev=net0,id=nic0,mac=0a:58:0a:58:00:05,romfile=",
    ]
    ram = Path("/proc/self/fd/7")
    for boot in (Boot.TEMPLATE, Boot.RESTORE):
        argv = vm_command(cfg, sdir, "tcg", boot=boot, ram_path=ram, nics=[nic]).argv()
        assert "-netdev" not in argv  # a template belongs to no pod: the NIC is hot-plugged
        assert "pcie-root-port,id=rp-hp1,bus=pcie.0,chassis=2" in argv
    assert nic.qmp_netdev() == {"type": "tap", "id": "net0", "fd": "9"}
    dev = nic.qmp_device(NIC_HOTPLUG_PORT.id)
    assert dev["bus"] == "rp-hp1" and dev["mac"] == nic.mac and dev["netdev"] == "net0"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fd": 1, "mac": "0a:58:0a:58:00:05"}, "tap fd 1"),
        ({"fd": 9, "mac": "0A:58:0A:58:00:05"}, "MAC '0A:58"),
        ({"fd": 9, "mac": "0a:58:0a:58:00"}, "MAC"),
        ({"fd": 9, "mac": "0a:58:0a:58:00:05", "index": 64}, "NIC index 64"),
    ],
)
def test_a_bad_nic_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        TapNic(**kwargs)  # type: ignore[arg-type]


def test_a_templated_boot_needs_its_ram_file(tmp_path: Path) -> None:
    sdir = SandboxDir.for_sandbox("pod1", Path("/run/pyvm/sbs"))
    with pytest.raises(InvalidArgument, match="ram_path"):
        vm_command(_cfg(tmp_path), sdir, "tcg", boot=Boot.RESTORE)


def test_key_ignores_the_sandbox_but_not_the_vm_or_its_files(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    key = store.template_key(cfg, "tcg")
    assert key == store.template_key(dataclasses.replace(cfg, timeouts=config.Timeouts(1, 1, 1, 1)), "tcg")
    assert key != store.template_key(cfg, "kvm")
    assert key != store.template_key(config.with_overrides(cfg, default_memory=1024), "tcg")
    assert key != store.template_key(config.with_overrides(cfg, vcpus=2), "tcg")
    assert key != store.template_key(cfg, "tcg", ["pyvm.debug=1"])
    kernel = cfg.hypervisor.kernel
    kernel.write_bytes(b"another kernel, another size")  # a rebuilt guest image
    assert store.template_key(cfg, "tcg") != key


def _publish(cfg: config.Config, key: str) -> store.Template:
    staging = store.staging_dir(cfg, key)
    (staging / "state").write_bytes(b"QEVM")
    (staging / "ram").write_bytes(b"")
    return store.publish(staging, cfg, key, {"note": "test"})


def test_find_only_a_complete_template_of_this_key(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert store.find(cfg, "tcg") is None
    key = store.template_key(cfg, "tcg")
    t = _publish(cfg, key)
    assert t.dir == tmp_path / "store" / "x86_64" / key
    assert store.find(cfg, "tcg") == t and store.find(cfg, "kvm") is None
    assert json.loads(t.meta.read_text())["note"] == "test"
    t.ram.unlink()
    assert store.find(cfg, "tcg") is None
    assert not list(t.dir.parent.glob(".*tmp-*"))  # staging renamed, nothing left


def test_quarantine_moves_it_aside_with_the_reason(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    t = _publish(cfg, store.template_key(cfg, "tcg"))
    bad = store.quarantine(t, "restore failed: bad state")
    assert bad is not None and not t.dir.exists() and (bad / "why").read_text().startswith("restore failed")
    assert store.find(cfg, "tcg") is None


def test_remove_keeps_the_used_template_and_running_builds(tmp_path: Path) -> None:
    from shim.sandbox import template as tmpl

    cfg = _cfg(tmp_path)
    used = _publish(cfg, store.template_key(cfg, "tcg"))
    old = _publish(cfg, "0" * 20)
    building = store.staging_dir(cfg, "1" * 20)  # named after this (live) process
    assert tmpl.remove(cfg, keep=[used]) == [old.dir]
    assert used.dir.exists() and building.exists()


def test_copy_data_copies_extents_and_keeps_holes(tmp_path: Path) -> None:
    src = store.new_ram_fd(64)  # a memfd, as QEMU's RAM
    try:
        os.pwrite(src, b"A" * 4096, 0)
        os.pwrite(src, b"B" * 8192, 40 * MiB)
        dest = tmp_path / "ram"  # another filesystem: the sendfile path
        assert store.save_ram(src, dest) >= 3 * 4096
        assert dest.stat().st_size == 64 * MiB and dest.stat().st_blocks * 512 < 4 * MiB
        back = store.new_ram_fd(64)
        try:
            t = store.Template(tmp_path, "k")
            assert store.load_ram(t, back) == store.save_ram(src, tmp_path / "ram2")
            assert os.pread(back, 4096, 0) == b"A" * 4096
            assert os.pread(back, 8192, 40 * MiB) == b"B" * 8192
            assert os.pread(back, 4096, 20 * MiB) == bytes(4096)
        finally:
            os.close(back)
    finally:
        os.close(src)


def test_factory_section_is_validated(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"factory\.enable_template"):
        config.loads("[factory]\nenable_template = 1\n")
    with pytest.raises(InvalidArgument, match=r"factory\.template_path"):
        config.loads('[factory]\ntemplate_path = "relative"\n')
    assert not config.loads("[factory]\nenable_template = false\n").factory.enable_template


def test_vcpu_variants_of_the_cli() -> None:
    from shim.cli.template import vcpu_variants

    assert vcpu_variants("", 1, 8) == [1]
    assert vcpu_variants("2,4", 1, 8) == [1, 2, 4]
    assert vcpu_variants("all", 1, 2) == [1, 2]
    for bad in ("two", "0", "1,,x"):
        with pytest.raises(InvalidArgument, match="--vcpus"):
            vcpu_variants(bad, 1, 2)
