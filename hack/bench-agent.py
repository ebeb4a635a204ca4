#!/usr/bin/env python3
"""Benchmark: QEMU start -> guest agent answering Health, next to the bare floor, in the same run.

Both boots go through the same QEMU driver (``shim.hypervisor.qemu.driver.QemuVM``) with the same
kernel, firmware (OVMF pflash), machine, memory and devices; they differ only in what the kernel
runs: the agent guest (initrd + root disk, ``python3 -m shim.guestagent`` as PID 1) or the floor
initramfs, which prints ``PYVM-FLOOR-READY`` and powers off. Runs alternate (floor, agent, floor,
...) so host noise hits both alike. Times are from just before ``QemuVM.start()`` (virtiofsd + QEMU
spawn) to the floor marker on the console / the first answered Health call.

    sudo .venv/bin/python hack/bench-agent.py [-n RUNS] [--memory MIB]

Needs root and the guest image (``.venv/bin/pyvm guest build --arch x86_64``). Target: agent <= 1.3x floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shim import config as config_mod
from shim.agentclient import wait_ready
from shim.hypervisor.qemu.driver import QemuVM
from shim.paths import SandboxDir, guest_dir
from shim.platform.accel import AccelVerdict

FLOOR_MARK = b"PYVM-FLOOR-READY"
DEADLINE = 240.0


async def one(kind: str, base: Path, memory: int) -> float:
    gdir = guest_dir("x86_64")
    cfg = config_mod.with_overrides(config_mod.defaults("x86_64"), default_memory=memory)
    if kind == "floor":
        cfg = config_mod.with_overrides(
            cfg, initrd=str(gdir / "floor-initrd.img"), image="", kernel_params="quiet pyvm.floor=poweroff"
        )
    sdir = SandboxDir.for_sandbox(f"bench-{kind}-{uuid.uuid4().hex[:6]}", base)
    vm = QemuVM(cfg, sdir, AccelVerdict("tcg", False, "benchmark under TCG", 10.0, None))
    try:
        t0 = time.monotonic()
        await vm.start()
        if kind == "agent":
            client = await wait_ready(vm.agent_socket_path, deadline=t0 + DEADLINE, timeout_factor=10.0)
            elapsed = time.monotonic() - t0
            await client.close()
            return elapsed
        while time.monotonic() - t0 < DEADLINE:
            try:
                if FLOOR_MARK in sdir.console_log.read_bytes():
                    return time.monotonic() - t0
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no {FLOOR_MARK.decode()} within {DEADLINE}s; see {sdir.console_log}")
    finally:
        await vm.stop()
        shutil.rmtree(sdir.root, ignore_errors=True)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB (both boots)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, list[float]] = {"floor": [], "agent": []}
    with tempfile.TemporaryDirectory(prefix="pyvm-bench-agent-") as tmp:
        for i in range(args.runs):
            for kind in ("floor", "agent"):
                t = await one(kind, Path(tmp), args.memory)
                results[kind].append(t)
                print(f"run {i + 1}/{args.runs} {kind:5s} {t:6.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["agent"] / med["floor"]
    print(f"median floor (QEMU start -> PYVM-FLOOR-READY): {med['floor']:.2f} s")
    print(f"median agent (QEMU start -> Health answered):  {med['agent']:.2f} s")
    print(f"agent / floor = {ratio:.2f} (target <= 1.3)")
    if args.json:
        print(json.dumps({"runs": results, "median": med, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
