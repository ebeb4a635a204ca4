"""`pyvm check [--config FILE]`: can this host run pyvm, and which accelerator really works?

One line per finding (``ok``/``WARN``/``FAIL``). Exit 1 if anything would fail at pod start; a TCG
fallback alone is a warning, unless the configuration demands ``accelerator = "kvm"``. Exit 2 if the
configuration itself is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from shim import config as config_mod
from shim.errors import ShimError
from shim.platform import accel
from shim.platform.host import (
    Finding,
    Level,
    check_cgroup2,
    check_dev_kvm,
    check_executable,
    check_file,
    check_qemu,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="configuration file (default: PYVM_CONFIG, /etc/pyvm)"
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="do not boot the accelerator probe VM (cache only)"
    )
    parser.add_argument("--reprobe", action="store_true", help="ignore the cached accelerator verdict")


def _print(f: Finding, out: TextIO) -> None:
    mark = {Level.OK: "ok  ", Level.WARN: "WARN", Level.FAIL: "FAIL"}[f.level]
    print(f"[{mark}] {f.name:<12} {f.detail}", file=out)


def findings(cfg: config_mod.Config, *, probe: bool = True, reprobe: bool = False) -> list[Finding]:
    hv, fs = cfg.hypervisor, cfg.shared_fs
    out = [
        Finding(
            "config",
            Level.OK,
            f"{cfg.source or 'built-in defaults'} ({hv.arch}, {hv.machine_type}, "
            f"memory_hotplug={hv.memory_hotplug}, accelerator={hv.accelerator})",
        )
    ]
    qemu = check_qemu(hv.path)
    out.append(qemu)
    guest_hint = "run `pyvm guest build`"
    for i, p in enumerate(hv.pflashes):
        out.append(
            check_file("firmware", f"hypervisor.pflashes[{i}]", p, hint="install ovmf / qemu-efi-aarch64")
        )
    if not hv.pflashes:
        out.append(Finding("firmware", Level.OK, "no UEFI firmware (direct kernel boot)"))
    out.append(check_file("kernel", "hypervisor.kernel", hv.kernel, hint=guest_hint))
    if hv.initrd is not None:
        out.append(check_file("initrd", "hypervisor.initrd", hv.initrd, hint=guest_hint))
    if hv.image is not None:
        out.append(check_file("image", "hypervisor.image", hv.image, hint=guest_hint))
    floor = hv.kernel.parent / "floor-initrd.img"
    out.append(
        check_file(
            "floor", "floor initramfs", floor, required=False, hint=guest_hint + " (probe uses no-root boot)"
        )
    )
    if fs.kind == "virtio-fs":
        out.append(check_executable("virtiofsd", "shared_fs.daemon", fs.daemon))
    out.append(check_cgroup2())
    out.append(check_dev_kvm())
    out.append(_accel_finding(cfg, qemu_ok=qemu.ok and hv.kernel.is_file(), probe=probe, reprobe=reprobe))
    out.append(_template_finding(cfg))
    return out


def _template_finding(cfg: config_mod.Config) -> Finding:
    """Whether pods restore a VM template or cold-boot (a slow start is a warning, not a failure)."""
    from shim.hypervisor.qemu import template as store

    if not cfg.factory.enable_template:
        return Finding("template", Level.OK, "disabled ([factory] enable_template = false): pods cold-boot")
    try:
        cached = accel.load_cached(accel.target_for(cfg.hypervisor))
    except ShimError:
        cached = None
    if cached is None:
        return Finding("template", Level.WARN, "unknown until the accelerator is probed")
    found = store.find(cfg, accel.resolve(cfg.hypervisor.accelerator, cached).accel)
    if found is None:
        return Finding(
            "template",
            Level.WARN,
            f"no VM template matches in {store.arch_dir(cfg)}: pods cold-boot (run `pyvm template build`)",
        )
    return Finding("template", Level.OK, f"pods restore {found.dir}")


def _accel_finding(cfg: config_mod.Config, *, qemu_ok: bool, probe: bool, reprobe: bool) -> Finding:
    hv = cfg.hypervisor
    if not qemu_ok:
        return Finding("accelerator", Level.FAIL, "cannot probe: QEMU or the guest kernel is missing")
    target = accel.target_for(hv)
    try:
        if probe:
            verdict = asyncio.run(accel.get_verdict(target, refresh=reprobe))
        else:
            cached = accel.load_cached(target)
            if cached is None:
                return Finding("accelerator", Level.WARN, "not probed yet (run without --no-probe)")
            verdict = cached
        verdict = accel.resolve(hv.accelerator, verdict)
    except ShimError as exc:
        return Finding("accelerator", Level.FAIL, str(exc))
    detail = f"{verdict.reason}; boot/agent timeouts x{verdict.speed_factor:g}"
    return Finding("accelerator", Level.WARN if verdict.degraded else Level.OK, detail)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    try:
        cfg = config_mod.load(args.config)
    except ShimError as exc:
        _print(Finding("config", Level.FAIL, str(exc)), stream)
        return 2
    results = findings(
        cfg, probe=not getattr(args, "no_probe", False), reprobe=getattr(args, "reprobe", False)
    )
    for f in results:
        _print(f, stream)
    failed = [f for f in results if f.level is Level.FAIL]
    if failed:
        print(f"pyvm check: {len(failed)} problem(s) would stop a pod from starting", file=stream)
        return 1
    print("pyvm check: this host can run pyvm", file=stream)
    return 0
