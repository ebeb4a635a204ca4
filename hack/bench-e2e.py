#!/usr/bin/env python3
"""End-to-end benchmark: pyvm under a real containerd 1.6 next to the bare floor, in one run.

Measured (medians of ``--runs`` N, runs of the different kinds interleaved, because timings on a
shared TCG host drift; only numbers from the same run compare):

- ``ctr run --rm --runtime io.containerd.pyvm.v2 IMG ID true``: wall time of the ctr command
  (shim start, VM boot, agent, container create/start/exit, teardown);
- floor (poweroff): the same QEMU binary, firmware (OVMF pflash), machine (q35), accelerator, CPU
  model, memory size and kernel with the minimal floor initramfs and ``pyvm.floor=poweroff``: QEMU
  exec until QEMU exits -- boot, run nothing, power off;
- CRI ``RunPodSandbox`` (runtime handler ``pyvm``): wall time of the RPC (shim, VM boot, pause
  container running), then Stop/Remove (not timed);
- floor (ready): the same floor VM until its init prints ``PYVM-FLOOR-READY``;
- host memory of one idle CRI pod: PSS (``/proc/<pid>/smaps``) of the shim, QEMU and virtiofsd
  processes, split into guest RAM (the memfd RAM backends, shared by QEMU and virtiofsd: what the
  guest touched) and everything else (the overhead the target is about). A VM restored from a
  template also holds template pages the guest has not touched again yet: in its boot-RAM memfd but
  mapped by no one, so in nobody's PSS; they are printed apart ("memfd held"), as guest RAM.

Pod VMs are restored from the configuration's VM template (``[factory] enable_template``, the default):
the template is built (or found up to date) before the timed runs, and its build time printed.
``--cold`` runs the shims with ``enable_template = false`` instead (every pod VM cold-boots).

Usage: .venv/bin/python hack/bench-e2e.py [--runs 3] [--config FILE] [--cold]
Needs root, containerd 1.6, the guest image (``pyvm guest build``), qemu and virtiofsd.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tomlkit  # noqa: E402

from shim import config  # noqa: E402
from shim.hypervisor.qemu import cmdline  # noqa: E402
from shim.platform import accel  # noqa: E402
from shim.sandbox.template import build as build_template  # noqa: E402
from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir  # noqa: E402
from tests.helpers.cri import CriContainerd  # noqa: E402
from tests.helpers.pyvm_vm import (  # noqa: E402
    RUNTIME,
    VENV_BIN,
    force_clean,
    pids_mentioning,
    qemu_pids,
    shim_pids,
    virtiofsd_pids,
)

MiB = 1 << 20
READY = b"PYVM-FLOOR-READY"


# -- the floor -------------------------------------------------------------------------------------


def floor_argv(
    cfg: config.Config, verdict: accel.AccelVerdict, workdir: Path, *, poweroff: bool
) -> list[str]:
    """Plain QEMU with the pyvm configuration's QEMU, firmware, machine, CPU, memory and kernel,
    booting the floor initramfs; no QMP, virtio devices, virtiofsd or agent."""
    hv = cfg.hypervisor
    g = hv.kernel.parent
    tcg = verdict.accel == "tcg"
    # the same kernel parameters as pyvm's VMs (console, panic, the configuration's, e.g. quiet)
    params = cmdline.kernel_cmdline(hv.arch, hv.kernel_params, ["pyvm.floor=poweroff"] if poweroff else [])
    argv = [
        str(hv.path),
        # the same -machine/-accel part as pyvm's VMs (TCG thread mode, translation cache size)
        *cmdline.Machine(
            hv.machine_type,
            verdict.accel,
            "ram0",
            None if hv.machine_type == "q35" else ("host" if verdict.accel == "kvm" else "3"),
            hv.tcg_tb_size,
        ).to_args(),
        "-cpu",
        hv.cpu_tcg if tcg else hv.cpu_kvm,
        "-m",
        f"{hv.default_memory}M",
        "-object",
        f"memory-backend-memfd,id=ram0,size={hv.default_memory}M,share=on",
        "-smp",
        str(hv.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(hv.kernel),
        "-initrd",
        str(g / "floor-initrd.img"),
        "-append",
        params,
    ]
    if hv.pflashes:
        shutil.copyfile(hv.pflashes[1], workdir / "vars.fd")
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={hv.pflashes[0]}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={workdir / 'vars.fd'}",
        ]
    return argv


def floor_poweroff(argv: list[str], timeout: float = 300) -> float:
    t0 = time.monotonic()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"floor VM exited {r.returncode}: {r.stdout[-500:]!r}")
    return dt


def floor_ready(argv: list[str], timeout: float = 300) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        buf = b""
        while READY not in buf:
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                raise RuntimeError(f"floor VM exited before {READY!r}: {buf[-500:]!r}")
            buf += chunk
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("floor VM not ready")
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


# -- memory ----------------------------------------------------------------------------------------


@dataclass
class Pss:
    total_kib: int = 0
    guest_ram_kib: int = 0  # PSS of the memfd RAM backends (guest memory the guest touched)
    memfd_held_kib: int = 0  # allocated in the boot-RAM memfd (restored VMs: mapped or not)

    @property
    def overhead_kib(self) -> int:
        return self.total_kib - self.guest_ram_kib


def pss_of(pid: int) -> Pss:
    """PSS of one process from /proc/<pid>/smaps, guest RAM mappings (memfd) counted apart.
    (smaps_rollup gives the same total; the per-mapping file is needed for the split.)"""
    out = Pss()
    current_is_ram = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping header: "addr perms offset dev inode [path]"
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
                current_is_ram = path.startswith("/memfd:")
            elif head == "Pss:":
                kib = int(line.split()[1])
                out.total_kib += kib
                if current_is_ram:
                    out.guest_ram_kib += kib
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                rollup = int(line.split()[1])
                # both are snapshots of a live process; they agree within a few pages
                assert abs(rollup - out.total_kib) < 4096, (rollup, out.total_kib)
    seen = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pyvm-ram"):
                continue
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            out.memfd_held_kib += st.st_blocks // 2
    return out


# -- runs ------------------------------------------------------------------------------------------


def ctr_run_true(c: Containerd, cfg_path: Path | None, n: int) -> float:
    extra = ["--runtime-config-path", str(cfg_path)] if cfg_path else []
    t0 = time.monotonic()
    r = c.ctr("run", "--rm", "--runtime", RUNTIME, *extra, BUSYBOX_REF, f"bench{n}", "true", timeout=300)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"ctr run failed ({r.returncode}): {r.stderr}\n{c.log_tail(20)}")
    return dt


def cri_run_pod(h: CriContainerd, n: int, *, measure_memory: bool) -> tuple[float, dict[str, Pss] | None]:
    t0 = time.monotonic()
    pod, _ = h.run_pod(f"bench{n}", runtime_handler="pyvm")
    dt = time.monotonic() - t0
    mem = None
    try:
        if measure_memory:
            time.sleep(5)  # idle: let the boot settle
            run_root = Path(h.extra_env["PYVM_RUN_ROOT"])
            procs = {
                "shim": [p for p in shim_pids(str(h.socket)) if pod in " ".join(_argv(p))],
                "qemu": qemu_pids(run_root, pod),
                "virtiofsd": virtiofsd_pids(run_root, pod),
            }
            mem = {}
            for name, pids in procs.items():
                acc = Pss()
                for p in pids:
                    one = pss_of(p)
                    acc.total_kib += one.total_kib
                    acc.guest_ram_kib += one.guest_ram_kib
                    acc.memfd_held_kib += one.memfd_held_kib
                mem[name] = acc
            mem["_restored"] = any("-incoming" in _argv(p) for p in procs["qemu"])  # type: ignore[assignment]
            mem["_pids"] = procs  # type: ignore[assignment]
    finally:
        h.client.stop_pod_sandbox(pod)
        h.client.remove_pod_sandbox(pod)
    return dt, mem


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--config", type=Path, help="pyvm configuration file (default: the built-in defaults)")
    ap.add_argument("--cold", action="store_true", help="no VM template: every pod VM cold-boots")
    ap.add_argument(
        "--shim-dir",
        type=Path,
        default=VENV_BIN,
        help="directory holding containerd-shim-pyvm-v2 (default: the venv's)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    # the configuration the shims will use (--config, else PYVM_CONFIG, /etc/pyvm/..., built-in
    # defaults), handed to them explicitly so the floor and pyvm boot the same settings
    cfg = config.load(args.config)
    cfg_path = cfg.source.resolve() if cfg.source else None  # the shims run in their bundle dirs
    # probe (or read the cached verdict) now, so no timed run pays for the accelerator probe
    target = accel.target_for(cfg.hypervisor)
    verdict = accel.resolve(cfg.hypervisor.accelerator, asyncio.run(accel.get_verdict(target)))
    probe_key = accel.cache_key(target)
    base = short_base_dir("pvb")
    if args.cold or not cfg.factory.enable_template:
        cfg_path = base / "pyvm-cold.toml"
        tables = config._to_tables(cfg)
        tables["factory"]["enable_template"] = False
        cfg_path.write_text(tomlkit.dumps(tables))
        cfg = config.load(cfg_path)
        print("no VM template: every pod VM cold-boots", flush=True)
    else:
        t0 = time.monotonic()
        built = asyncio.run(build_template(cfg, verdict=verdict))
        how = f"built in {time.monotonic() - t0:.1f} s" if built.built else "up to date"
        print(f"VM template {built.template.dir}: {how} (not timed)", flush=True)
    run_root = base / "r"
    run_root.mkdir()
    env = {"PYVM_RUN_ROOT": str(run_root)}
    results: dict[str, list[float]] = {k: [] for k in ("ctr", "floor_off", "cri", "floor_ready")}
    mem: dict[str, Pss] | None = None
    try:
        image = build_busybox_image(base / "bb.tar")
        with (
            Containerd(base / "c", extra_path=[args.shim_dir], env=env) as c,
            CriContainerd(base, pyvm_config_path=cfg_path, shim_dirs=[args.shim_dir], env=env) as h,
        ):
            c.import_image(image)
            for n in range(args.runs):
                fw = base / f"fw{n}"
                fw.mkdir()
                results["floor_off"].append(floor_poweroff(floor_argv(cfg, verdict, fw, poweroff=True)))
                results["ctr"].append(ctr_run_true(c, cfg_path, n))
                results["floor_ready"].append(floor_ready(floor_argv(cfg, verdict, fw, poweroff=False)))
                dt, m = cri_run_pod(h, n, measure_memory=(n == args.runs - 1))
                results["cri"].append(dt)
                mem = m or mem
                print(
                    f"run {n + 1}/{args.runs}: floor(poweroff) {results['floor_off'][-1]:.1f}s  "
                    f"ctr run --rm true {results['ctr'][-1]:.1f}s  floor(ready) {results['floor_ready'][-1]:.1f}s  "
                    f"RunPodSandbox {results['cri'][-1]:.1f}s",
                    flush=True,
                )
    finally:
        leftovers = qemu_pids(run_root) + virtiofsd_pids(run_root) + pids_mentioning(str(base))
        force_clean(base, run_root)
        if leftovers:
            print(f"WARNING: killed leftover processes {leftovers}", file=sys.stderr)

    if accel.cache_key(target) != probe_key:
        print(
            "WARNING: the guest kernel changed during the run (guest image rebuilt?): a shim may have "
            "re-run the accelerator probe inside a timed run; numbers are suspect",
            file=sys.stderr,
        )
    med = {k: statistics.median(v) for k, v in results.items()}
    hv = cfg.hypervisor
    print()
    print(
        f"accelerator {verdict.accel}, machine {hv.machine_type}, firmware "
        f"{'OVMF pflash' if hv.pflashes else 'none'}, {hv.default_memory} MiB, {hv.vcpus} vCPU, "
        f"tb-size {hv.tcg_tb_size or 'default'}, kernel params {hv.kernel_params!r}; config "
        f"{cfg_path or 'built-in defaults'}; medians of {args.runs}; load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'time':42} {'pyvm':>8} {'floor':>8} {'ratio':>7} {'target':>7}")
    for label, ours, floor in (
        ("ctr run --rm ... true  vs floor(poweroff)", "ctr", "floor_off"),
        ("CRI RunPodSandbox      vs floor(ready)", "cri", "floor_ready"),
    ):
        ratio = med[ours] / med[floor]
        ok = "ok" if ratio <= 1.3 else "MISS"
        print(f"{label:42} {med[ours]:7.1f}s {med[floor]:7.1f}s {ratio:6.2f}x {'<=1.3x':>7} {ok}")
    if mem:
        pids = mem.pop("_pids")  # type: ignore[arg-type]
        restored = mem.pop("_restored")
        print()
        print(f"{'host memory of one idle pod (PSS, MiB)':42} {'total':>8} {'guest RAM':>10} {'overhead':>9}")
        tot = Pss()
        for name in ("shim", "qemu", "virtiofsd"):
            m = mem[name]
            tot.total_kib += m.total_kib
            tot.guest_ram_kib += m.guest_ram_kib
            print(
                f"{name + ' ' + str(pids[name]):42} {m.total_kib / 1024:8.1f} "  # type: ignore[index]
                f"{m.guest_ram_kib / 1024:10.1f} {m.overhead_kib / 1024:9.1f}"
            )
        ok = "ok" if tot.overhead_kib / 1024 <= 60 else "MISS"
        print(
            f"{'all':42} {tot.total_kib / 1024:8.1f} {tot.guest_ram_kib / 1024:10.1f} "
            f"{tot.overhead_kib / 1024:9.1f}  target <= 60 MiB beyond guest RAM: {ok}"
        )
        held = mem["qemu"].memfd_held_kib / 1024
        print(
            f"the pod VM was {'restored from its template' if restored else 'cold-booted'}; its boot-RAM "
            f"memfd holds {held:.1f} MiB of guest RAM (mapped or not; counted as guest RAM, not overhead)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
