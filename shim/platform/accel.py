"""Which accelerator really works here, and how fast guests run.

``/dev/kvm`` existing proves nothing: on our own hosts it is a paravirtual nested KVM under which a stock
guest kernel hangs (with ``-cpu host`` QEMU even aborts on an MSR write). So KVM is used only if a real
guest boots under it: the probe boots the guest kernel with the *floor* initramfs
(``<guest>/floor-initrd.img``: prints ``PYVM-FLOOR-READY <uptime>`` and powers off with
``pyvm.floor=poweroff``) under ``-accel kvm`` with a short deadline (:data:`KVM_PROBE_TIMEOUT`).
Without a floor initramfs the kernel is booted with no root at all; reaching the "Unable to mount root"
panic proves the same thing.

If KVM fails, the same floor is booted under TCG and timed. **Speed factor** = measured floor boot wall
time / :data:`FLOOR_REFERENCE_S` (what this floor takes under working KVM: QEMU start + direct kernel
boot of the Debian cloud kernel to /init, ~0.8 s), clamped to [1, 20]. Every boot/agent/QMP timeout is
multiplied by it (:meth:`shim.config.Timeouts.scaled`), so timeouts follow the measured speed of this
host instead of a constant. Under working KVM the factor comes from the KVM floor boot the same way
(a slow nested host gets proportionally longer timeouts).

The verdict is cached in ``<CACHE_ROOT>/accel.json`` per (host kernel release, QEMU path+version, guest
arch, guest kernel content); a file lock keeps concurrent shims from probing at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shim import paths
from shim.config import HypervisorConfig
from shim.errors import FailedPrecondition
from shim.log import get_logger
from shim.platform.host import kvm_usable_device, qemu_info

log = get_logger("pyvm.platform.accel")

KVM_PROBE_TIMEOUT = 6.0
TCG_PROBE_TIMEOUT = 90.0
FLOOR_REFERENCE_S = 0.8
FACTOR_MIN, FACTOR_MAX = 1.0, 20.0
READY_MARK = b"PYVM-FLOOR-READY"
_NOROOT_MARKS = (b"Unable to mount root", b"Kernel panic")
CACHE_VERSION = 1


@dataclass(frozen=True)
class AccelVerdict:
    """What the probe found. ``accel`` is what ``accelerator = "auto"`` uses."""

    accel: str  # "kvm" | "tcg"
    kvm_works: bool
    #: why KVM is (not) used: "ok", "no /dev/kvm", "guest did not boot within 6 s under -accel kvm (hang)", ...
    kvm_result: str
    speed_factor: float
    #: wall seconds of the floor boot the factor was computed from (None if not measured)
    floor_boot_s: float | None
    key: str = ""
    probed_at: float = 0.0

    @property
    def degraded(self) -> bool:
        """True when guests run emulated (TCG): the metrics layer turns this into a label."""
        return self.accel != "kvm"

    @property
    def reason(self) -> str:
        if self.accel == "kvm":
            return f"KVM works (floor guest booted in {self.floor_boot_s or 0:.2f} s)"
        return f"TCG (software emulation, ~{self.speed_factor:.1f}x slower than KVM): KVM unusable: {self.kvm_result}"


@dataclass(frozen=True)
class ProbeTarget:
    qemu: Path
    arch: str
    kernel: Path
    floor_initrd: Path | None
    cpu_kvm: str = "host"
    cpu_tcg: str = "max"


def target_for(hv: HypervisorConfig) -> ProbeTarget:
    """The probe target of a configuration: its QEMU and kernel, the floor initramfs next to the kernel."""
    floor = hv.kernel.parent / "floor-initrd.img"
    return ProbeTarget(
        hv.path, hv.arch, hv.kernel, floor if floor.is_file() else None, hv.cpu_kvm, hv.cpu_tcg
    )


def host_arch() -> str:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=8)
def _kernel_digest(path: Path, size: int, mtime_ns: int) -> str:
    """Content digest of the guest kernel (memoized per path/size/mtime within one process)."""
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_key(t: ProbeTarget) -> str:
    """What the verdict depends on: host kernel, QEMU binary and version, arch, guest kernel *content*.

    The guest kernel is identified by its content, not its mtime: a guest image rebuild rewrites the
    same kernel, and keying on mtime made the first shim after every rebuild pay a new probe (3-11 s).
    """
    try:
        st = t.kernel.stat()
        kid = f"{st.st_size}:{_kernel_digest(t.kernel.resolve(), st.st_size, st.st_mtime_ns)}"
    except OSError:
        kid = f"{t.kernel}:missing"
    qv = qemu_info(t.qemu).version
    return f"v{CACHE_VERSION}|{os.uname().release}|{t.qemu}@{qv}|{t.arch}|{kid}"


def _cache_file() -> Path:
    return Path(os.environ.get("PYVM_CACHE_ROOT", str(paths.CACHE_ROOT))) / "accel.json"


def load_cached(t: ProbeTarget) -> AccelVerdict | None:
    try:
        data = json.loads(_cache_file().read_text())
        entry = data.get(cache_key(t))
        return AccelVerdict(**entry) if entry else None
    except (OSError, ValueError, TypeError):
        return None


def _store(v: AccelVerdict) -> None:
    f = _cache_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(f.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[v.key] = asdict(v)
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, f)


def _factor(wall: float) -> float:
    return round(min(FACTOR_MAX, max(FACTOR_MIN, wall / FLOOR_REFERENCE_S)), 2)


async def get_verdict(t: ProbeTarget, *, refresh: bool = False) -> AccelVerdict:
    """The cached verdict for ``t``, probing (a few seconds, boots VMs) when there is none."""
    if not refresh and (v := load_cached(t)) is not None:
        return v
    lock = _cache_file().with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # another shim may be probing right now: wait for it, then use its answer
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        if not refresh and (v := load_cached(t)) is not None:
            return v
        v = await probe(t)
        _store(v)
        return v
    finally:
        os.close(fd)  # releases the lock


async def probe(t: ProbeTarget) -> AccelVerdict:
    """Boot the floor under KVM (if possible), else time it under TCG. Never raises for a bad KVM."""
    key = cache_key(t)
    if t.arch != host_arch():
        kvm_result = f"guest arch {t.arch} differs from host arch {host_arch()}"
    elif not kvm_usable_device():
        kvm_result = "/dev/kvm is absent or not read-write"
    else:
        ok, wall, why = await boot_floor(t, accel="kvm", timeout=KVM_PROBE_TIMEOUT)
        if ok:
            v = AccelVerdict("kvm", True, "ok", _factor(wall), round(wall, 3), key, time.time())
            log.info("accelerator probe: KVM works", floor_boot_s=v.floor_boot_s, speed_factor=v.speed_factor)
            return v
        kvm_result = why
    ok, wall, why = await boot_floor(t, accel="tcg", timeout=TCG_PROBE_TIMEOUT)
    if not ok:
        raise FailedPrecondition(
            f"the guest kernel {t.kernel} does not boot even under TCG: {why}", kernel=str(t.kernel)
        )
    v = AccelVerdict("tcg", False, kvm_result, _factor(wall), round(wall, 3), key, time.time())
    log.warning(
        "accelerator probe: KVM does not work, VMs will run under TCG (software emulation)",
        kvm_result=kvm_result,
        floor_boot_s=v.floor_boot_s,
        speed_factor=v.speed_factor,
    )
    return v


def floor_argv(t: ProbeTarget, accel: str) -> list[str]:
    """A minimal direct-kernel boot of the floor guest (no firmware: the question is the CPU)."""
    cpu = t.cpu_kvm if accel == "kvm" else t.cpu_tcg
    console = "ttyAMA0" if t.arch == "aarch64" else "ttyS0"
    if t.arch == "aarch64":
        machine = ["-machine", "virt,gic-version=" + ("host" if accel == "kvm" else "3")]
    else:
        machine = ["-machine", "q35"]
    accel_arg = "kvm" if accel == "kvm" else "tcg,thread=multi"
    argv = [
        str(t.qemu),
        *machine,
        "-accel",
        accel_arg,
        "-cpu",
        cpu,
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(t.kernel),
    ]
    params = f"console={console} panic=-1 quiet"
    if t.floor_initrd is not None:
        argv += ["-initrd", str(t.floor_initrd)]
        params += " pyvm.floor=poweroff"
    return [*argv, "-append", params]


async def boot_floor(t: ProbeTarget, *, accel: str, timeout: float) -> tuple[bool, float, str]:  # noqa: ASYNC109
    """Boot the floor once: (booted, wall seconds, reason when not)."""
    argv = floor_argv(t, accel)
    marks = (READY_MARK,) if t.floor_initrd is not None else _NOROOT_MARKS
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    seen = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = (seen + chunk)[-65536:]
                if any(m in seen for m in marks):
                    return True, time.monotonic() - t0, "ok"
        rc = await proc.wait()
        err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
        tail = " | ".join(err[-3:]) if err else "no error output"
        return (
            False,
            time.monotonic() - t0,
            f"QEMU -accel {accel} {'was killed by signal ' + str(-rc) if rc < 0 else f'exited with code {rc}'} "
            f"before the guest booted: {tail}",
        )
    except TimeoutError:
        return (
            False,
            time.monotonic() - t0,
            (f"guest did not boot within {timeout:g} s under -accel {accel} (hang)"),
        )
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def resolve(accelerator: str, verdict: AccelVerdict) -> AccelVerdict:
    """Apply ``hypervisor.accelerator`` to the probe: the verdict the VM must run with.

    Raises FailedPrecondition for ``kvm`` when the probe says KVM does not boot a guest here.
    """
    if accelerator == "kvm" and not verdict.kvm_works:
        raise FailedPrecondition(
            f'hypervisor.accelerator = "kvm" but KVM does not work on this host: {verdict.kvm_result}. '
            'Use accelerator = "auto" (falls back to TCG) or fix KVM.',
            key="hypervisor.accelerator",
            kvm_result=verdict.kvm_result,
        )
    if accelerator == "tcg" and verdict.accel != "tcg":
        # forced TCG on a KVM host: no TCG measurement, assume the reference ratio
        return AccelVerdict(
            "tcg",
            verdict.kvm_works,
            'disabled by hypervisor.accelerator = "tcg"',
            max(verdict.speed_factor, 6.0),
            verdict.floor_boot_s,
            verdict.key,
            verdict.probed_at,
        )
    return verdict


async def verdict_for(hv: HypervisorConfig) -> AccelVerdict:
    """The verdict a VM of ``hv`` runs with: the (cached) probe of its target, with
    ``hv.accelerator`` applied (:func:`resolve`)."""
    return resolve(hv.accelerator, await get_verdict(target_for(hv)))


__all__ = [
    "AccelVerdict",
    "FLOOR_REFERENCE_S",
    "KVM_PROBE_TIMEOUT",
    "ProbeTarget",
    "boot_floor",
    "cache_key",
    "floor_argv",
    "get_verdict",
    "load_cached",
    "probe",
    "resolve",
    "target_for",
    "verdict_for",
]
