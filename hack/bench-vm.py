#!/usr/bin/env python3
"""Benchmark the sandbox VM against the bare floor, in one run (timings on shared TCG hosts are noisy;
only numbers from the same run compare).

- boot-to-ready: QemuVM.start() until the floor guest prints PYVM-FLOOR-READY, vs. a plain QEMU command
  line with the same firmware, kernel and floor initrd (-serial stdio, no virtiofsd/QMP/virtio devices);
- pc-dimm hot-add of 512 MiB: QemuVM.resize_memory() (object-add, device_add, wait for ACPI_DEVICE_OST),
  vs. the same three steps over raw QMP on the bare floor VM;
- virtio-mem grow by 512 MiB: QemuVM.resize_memory() (qom-set, poll size), vs. raw qom-set + polling.

Usage: .venv/bin/python hack/bench-vm.py [--arch x86_64|aarch64] [--runs 3] [--no-firmware]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu.qmp import EventListener, QMPClient

from shim import config
from shim.hypervisor.qemu.driver import QemuVM
from shim.paths import SandboxDir, guest_dir
from shim.platform import accel

MiB = 1 << 20


def floor_cfg(arch: str, hotplug: str, firmware: bool) -> config.Config:
    g = guest_dir(arch)
    over: dict[str, object] = {
        "kernel": str(g / "vmlinuz"),
        "initrd": str(g / "floor-initrd.img"),
        "image": "",
        "default_memory": 512,
        "max_memory": 4096,
        "memory_slots": 8 if hotplug == "acpi" else 0,
        "memory_hotplug": hotplug,
        "kernel_params": "quiet memhp_default_state=online_movable",
    }
    if not firmware:
        over["pflashes"] = []
    return config.with_overrides(config.defaults(arch), **over)


async def wait_ready(path: Path, timeout: float = 180) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while b"PYVM-FLOOR-READY" not in path.read_bytes():  # noqa: ASYNC240
        if time.monotonic() > deadline:
            raise TimeoutError(f"floor not ready: {path}")
        await asyncio.sleep(0.01)


async def driver_run(cfg: config.Config, verdict: accel.AccelVerdict, root: Path, n: int) -> dict[str, float]:
    sd = SandboxDir.for_sandbox(f"bench{n}{cfg.hypervisor.memory_hotplug.replace('-', '')}", root)
    vm = QemuVM(cfg, sd, verdict)
    t0 = time.monotonic()
    try:
        await vm.start()
        await wait_ready(sd.console_log)
        out = {"boot": time.monotonic() - t0}
        t1 = time.monotonic()
        await vm.resize_memory(1024 * MiB)
        out["hotplug"] = time.monotonic() - t1
        return out
    finally:
        await vm.stop()


async def bare_run(cfg: config.Config, verdict: accel.AccelVerdict, root: Path, n: int) -> dict[str, float]:
    hv = cfg.hypervisor
    d = root / f"bare{n}"
    d.mkdir(parents=True)
    qmp_sock = d / "qmp.sock"
    console = "ttyAMA0" if hv.arch == "aarch64" else "ttyS0"
    machine = "virt,gic-version=3" if hv.machine_type == "virt" else "q35"
    argv = [
        str(hv.path),
        "-machine",
        f"{machine},memory-backend=ram0",
        "-accel",
        "tcg,thread=multi" if verdict.accel == "tcg" else "kvm",
        "-cpu",
        hv.cpu_tcg if verdict.accel == "tcg" else hv.cpu_kvm,
        "-m",
        "512M,slots=8,maxmem=4096M" if hv.memory_hotplug == "acpi" else "512M,maxmem=4096M",
        "-object",
        "memory-backend-memfd,id=ram0,size=512M,share=on",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-qmp",
        f"unix:{qmp_sock},server=on,wait=off",
        "-kernel",
        str(hv.kernel),
        "-initrd",
        str(hv.initrd),
        "-append",
        f"console={console} panic=-1 quiet memhp_default_state=online_movable",
    ]
    if hv.pflashes:
        shutil.copyfile(hv.pflashes[1], d / "vars.fd")
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={hv.pflashes[0]}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={d / 'vars.fd'}",
        ]
    if hv.memory_hotplug == "virtio-mem":
        argv += [
            "-object",
            "memory-backend-memfd,id=vm0,size=3584M,share=on",
            "-device",
            "virtio-mem-pci,id=vmem0,memdev=vm0,requested-size=0",
        ]
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        buf = b""
        while b"PYVM-FLOOR-READY" not in buf:
            chunk = await asyncio.wait_for(proc.stdout.read(4096), 180)
            if not chunk:
                raise RuntimeError("bare QEMU exited")
            buf = buf[-256:] + chunk
        out = {"boot": time.monotonic() - t0}
        drain = asyncio.create_task(proc.stdout.read())
        qmp = QMPClient("bench")
        await qmp.connect(str(qmp_sock))
        t1 = time.monotonic()
        if hv.memory_hotplug == "acpi":
            with qmp.listen(listener := EventListener(("ACPI_DEVICE_OST",))):
                await qmp.execute(
                    "object-add",
                    {"qom-type": "memory-backend-memfd", "id": "m1", "size": 512 * MiB, "share": True},
                )
                await qmp.execute("device_add", {"driver": "pc-dimm", "id": "d1", "memdev": "m1"})
                await asyncio.wait_for(listener.get(), 60)
        else:
            await qmp.execute(
                "qom-set",
                {"path": "/machine/peripheral/vmem0", "property": "requested-size", "value": 512 * MiB},
            )
            size_arg = {"path": "/machine/peripheral/vmem0", "property": "size"}
            while await qmp.execute("qom-get", size_arg) != 512 * MiB:  # noqa: ASYNC110 (QEMU has no event for it)
                await asyncio.sleep(0.02)
        out["hotplug"] = time.monotonic() - t1
        await qmp.disconnect()
        drain.cancel()
        return out
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="x86_64", choices=config.ARCHES)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-firmware", action="store_true", help="direct kernel boot (no UEFI)")
    args = ap.parse_args()
    g = guest_dir(args.arch)
    if not (g / "floor-initrd.img").is_file():
        print(f"no floor guest in {g}: run `pyvm guest build --arch {args.arch}`", file=sys.stderr)
        return 2
    results: dict[tuple[str, str], list[float]] = {}
    root = Path(tempfile.mkdtemp(prefix="pyvm-bench-"))
    try:
        for hotplug in ("acpi", "virtio-mem"):
            cfg = floor_cfg(args.arch, hotplug, not args.no_firmware)
            verdict = accel.resolve(
                cfg.hypervisor.accelerator, await accel.get_verdict(accel.target_for(cfg.hypervisor))
            )
            for n in range(args.runs):
                # alternate the order so drift on a noisy host hits both sides alike
                pair = [("driver", driver_run), ("bare", bare_run)]
                for who, fn in pair if n % 2 == 0 else pair[::-1]:
                    r = await fn(cfg, verdict, root / hotplug, n)
                    if hotplug == "acpi":
                        results.setdefault(("boot-to-ready", who), []).append(r["boot"])
                    results.setdefault(
                        (f"hot-add 512 MiB ({'pc-dimm' if hotplug == 'acpi' else hotplug})", who), []
                    ).append(r["hotplug"])
                    print(
                        f"  {hotplug:10} {who:6} run {n}: "
                        + ", ".join(f"{k}={v:.3f}s" for k, v in r.items()),
                        file=sys.stderr,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fw = "no firmware" if args.no_firmware else "UEFI pflash"
    print(
        f"\n{args.arch}, {fw}, accel={verdict.accel} (x{verdict.speed_factor:g}), {args.runs} runs, medians"
    )
    print(f"{'metric':34} {'pyvm driver':>12} {'bare floor':>12} {'overhead':>10}")
    for metric in dict.fromkeys(m for m, _ in results):
        d = statistics.median(results[(metric, "driver")])
        b = statistics.median(results[(metric, "bare")])
        unit, k = ("s", 1.0) if metric.startswith("boot") else ("ms", 1000.0)
        print(
            f"{metric:34} {d * k:>10.{2 if unit == 's' else 1}f}{unit:>2} {b * k:>10.{2 if unit == 's' else 1}f}"
            f"{unit:>2} {(d - b) * k:>+8.{2 if unit == 's' else 1}f}{unit:>2}"
        )
    return 0


if __name__ == "__main__":
    from shim.log import configure

    configure(level=os.environ.get("PYVM_LOG_LEVEL", "warning"), json=False)
    sys.exit(asyncio.run(main()))
