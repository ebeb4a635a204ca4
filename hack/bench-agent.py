#!/usr/bin/env python3
"""Benchmark: QEMU start -> guest agent answering Health, next to two floors, in the same run.

Three boots, same QEMU, kernel, firmware (OVMF pflash), machine, CPU, accelerator and memory (the
configuration's ``default_memory`` unless ``--memory``); runs alternate (bare floor, floor with
devices, agent, ...) so host noise hits all alike:

- **floor (bare)**: plain QEMU booting the floor initramfs (``/init`` loads the virtio modules and
  prints ``PYVM-FLOOR-READY``); no QMP, no virtio devices, no virtiofsd -- the same floor as
  ``hack/bench-e2e.py``. Time: QEMU exec -> the marker on the serial console.
- **floor (devices)**: the floor initramfs booted through pyvm's QEMU driver (``QemuVM``: virtiofsd,
  QMP, virtio-serial, virtio-fs, the root disk...). Time: just before ``QemuVM.start()`` -> the marker.
- **agent**: the agent guest through ``QemuVM`` (initrd + root disk, ``python3 -m shim.guestagent``
  as PID 1), cold boot. Time: just before ``QemuVM.start()`` -> the first answered Health call.
- **agent-template**: the same VM restored from its VM template (what pods get by default, ``[factory]
  enable_template``), built once into a temp store before the timed runs (its build time is printed).
  Time: just before ``boot_vm()`` (copying the template RAM, QEMU, loading the device state, hot-plugging
  virtio-fs) -> the first answered Health call. Also shown, from
  the guest's own clock (seconds of uptime): pyvm-init started, agent entry (``PYVM-AGENT-ENTRY``),
  agent serving (the ``agent serving`` line of guest.log, which also names the protobuf backend),
  deferred modules loaded (``PYVM-MODULES-LOADED``).

    sudo .venv/bin/python hack/bench-agent.py [-n RUNS] [--memory MIB] [--json]

Needs root and the guest image (``.venv/bin/pyvm guest build --arch x86_64``). Target: agent <= 1.3x floor.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shim import config as config_mod  # noqa: E402
from shim import log as shimlog  # noqa: E402
from shim.agentclient import wait_ready  # noqa: E402
from shim.hypervisor.qemu.cmdline import Boot  # noqa: E402
from shim.hypervisor.qemu.driver import QemuVM  # noqa: E402
from shim.paths import SandboxDir, guest_dir  # noqa: E402
from shim.platform import accel  # noqa: E402
from shim.sandbox.template import boot_vm  # noqa: E402
from shim.sandbox.template import build as build_template  # noqa: E402

FLOOR_MARK = b"PYVM-FLOOR-READY"
ENTRY_RE = re.compile(rb"PYVM-AGENT-ENTRY (\S+)(?: \(pyvm-init started at (\S+)\))?")
MODULES_RE = re.compile(rb"PYVM-MODULES-LOADED (\S+)")
DEADLINE = 240.0
KINDS = ("floor-bare", "floor-devices", "agent", "agent-template")


def _bench_e2e() -> object:
    """hack/bench-e2e.py as a module (its file name is not importable): one floor command line."""
    spec = importlib.util.spec_from_file_location("bench_e2e", REPO / "hack" / "bench-e2e.py")
    assert spec is not None and spec.loader is not None
    mod = sys.modules.get("bench_e2e")
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_e2e"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return mod


def floor_bare(cfg: config_mod.Config, verdict: accel.AccelVerdict, work: Path) -> float:
    e2e = _bench_e2e()
    argv = e2e.floor_argv(cfg, verdict, work, poweroff=False)  # type: ignore[attr-defined]
    return float(e2e.floor_ready(argv, timeout=DEADLINE))  # type: ignore[attr-defined]


async def through_driver(
    kind: str, cfg: config_mod.Config, verdict: accel.AccelVerdict, base: Path
) -> tuple[float, dict[str, object]]:
    gdir = guest_dir(cfg.hypervisor.arch)
    if kind == "floor-devices":
        cfg = config_mod.with_overrides(
            cfg, initrd=str(gdir / "floor-initrd.img"), image="", kernel_params="quiet pyvm.floor=poweroff"
        )
    sdir = SandboxDir.for_sandbox(f"bench-{kind[:5]}-{uuid.uuid4().hex[:6]}", base)
    if kind == "agent-template":
        t0 = time.monotonic()
        vm, client = await boot_vm(cfg, sdir, verdict)
        elapsed = time.monotonic() - t0
        await client.close()
        await vm.stop()
        shutil.rmtree(sdir.root, ignore_errors=True)
        if vm.boot is not Boot.RESTORE:
            raise RuntimeError(f"the template was not restored (boot {vm.boot.value}): see the log above")
        return elapsed, {"restore": dict(vm.restore_stats)}
    vm = QemuVM(cfg, sdir, verdict)
    guest: dict[str, object] = {}
    try:
        t0 = time.monotonic()
        await vm.start()
        if kind == "agent":
            client = await wait_ready(vm.agent_socket_path, deadline=t0 + DEADLINE, timeout_factor=10.0)
            elapsed = time.monotonic() - t0
            await client.close()
            guest = guest_times(sdir)
            return elapsed, guest
        while time.monotonic() - t0 < DEADLINE:
            try:
                if FLOOR_MARK in sdir.console_log.read_bytes():
                    return time.monotonic() - t0, guest
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no {FLOOR_MARK.decode()} within {DEADLINE}s; see {sdir.console_log}")
    finally:
        await vm.stop()
        shutil.rmtree(sdir.root, ignore_errors=True)


def guest_times(sdir: SandboxDir) -> dict[str, object]:
    """Guest uptimes at pyvm-init start, agent entry and agent serving (None where not found)."""
    out: dict[str, object] = {"init": None, "entry": None, "serving": None, "modules": None, "protobuf": None}
    try:
        console = sdir.console_log.read_bytes()
        m = ENTRY_RE.search(console)
        if m:
            out["entry"] = _num(m.group(1))
            out["init"] = _num(m.group(2) or b"")
        m = MODULES_RE.search(console)
        if m:
            out["modules"] = _num(m.group(1))
    except FileNotFoundError:
        pass
    try:
        for line in sdir.guest_log.read_text(errors="replace").splitlines():
            if '"agent serving"' in line:
                rec = json.loads(line)
                out["serving"], out["protobuf"] = rec.get("uptime"), rec.get("protobuf")
                break
    except (FileNotFoundError, ValueError):
        pass
    return out


def _num(b: bytes) -> float | None:
    try:
        return float(b)
    except ValueError:
        return None


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, help="guest MiB, every boot (default: the configuration's)")
    ap.add_argument("--config", type=Path, help="pyvm configuration file (default: the usual lookup)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shimlog.configure(level="warning")  # the driver's info lines would bury the results
    cfg = config_mod.load(args.config)
    if args.memory:
        cfg = config_mod.with_overrides(cfg, default_memory=args.memory)
    target = accel.target_for(cfg.hypervisor)
    verdict = accel.resolve(cfg.hypervisor.accelerator, await accel.get_verdict(target))
    results: dict[str, list[float]] = {k: [] for k in KINDS}
    guest: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="pyvm-bench-agent-") as tmp:
        cfg = dataclasses.replace(cfg, factory=config_mod.FactoryConfig(True, Path(tmp) / "templates"))
        built = await build_template(cfg, verdict=verdict)
        st = built.stats
        print(
            f"template built in {st['build_s']:.1f} s (once; agent ready after {st['agent_ready_s']:.1f} s): "
            f"{st['ram_bytes'] / 2**20:.0f} MiB guest RAM, {st['state_bytes'] / 2**20:.1f} MiB device state",
            flush=True,
        )
        for i in range(args.runs):
            for kind in KINDS:
                if kind == "floor-bare":
                    work = Path(tmp) / f"fw{i}"
                    work.mkdir()
                    t = await asyncio.to_thread(floor_bare, cfg, verdict, work)
                else:
                    t, g = await through_driver(kind, cfg, verdict, Path(tmp))
                    if kind == "agent":
                        guest.append(g)
                results[kind].append(t)
                extra = ""
                if kind == "agent-template":
                    extra = "  (" + ", ".join(f"{k} {v:.3f}" for k, v in g["restore"].items()) + ")"  # type: ignore[union-attr]
                if kind == "agent":
                    g = guest[-1]
                    extra = (
                        f"  (guest uptime: pyvm-init {g['init']}, entry {g['entry']}, serving "
                        f"{g['serving']}, deferred modules loaded {g['modules']}; protobuf {g['protobuf']})"
                    )
                print(f"run {i + 1}/{args.runs} {kind:13s} {t:6.2f} s{extra}", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    hv = cfg.hypervisor
    print()
    print(
        f"accelerator {verdict.accel}, machine {hv.machine_type}, firmware "
        f"{'pflash' if hv.pflashes else 'none'}, {hv.default_memory} MiB, {hv.vcpus} vCPU; "
        f"medians of {args.runs}; load {os.getloadavg()[0]:.1f}"
    )
    for key in ("init", "entry", "serving", "modules"):
        vals = [float(g[key]) for g in guest if isinstance(g.get(key), (int, float))]  # type: ignore[arg-type]
        if vals:
            print(f"guest uptime at {key:8s}: median {statistics.median(vals):.2f} s")
    print(f"median floor (bare QEMU, exec -> PYVM-FLOOR-READY):     {med['floor-bare']:.2f} s")
    print(f"median floor (QemuVM + devices, start -> marker):       {med['floor-devices']:.2f} s")
    print(f"median agent, cold (QemuVM start -> Health answered):   {med['agent']:.2f} s")
    print(f"median agent, template (boot_vm -> Health answered):    {med['agent-template']:.2f} s")
    for agent in ("agent", "agent-template"):
        for floor in ("floor-bare", "floor-devices"):
            ratio = med[agent] / med[floor]
            print(
                f"{agent:14s} / {floor:13s} = {ratio:.2f} (target <= 1.3) {'ok' if ratio <= 1.3 else 'MISS'}"
            )
    if args.json:
        print(json.dumps({"runs": results, "median": med, "guest": guest, "memory_mib": hv.default_memory}))
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main()))
