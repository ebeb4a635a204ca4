"""Host probes: what is installed and usable here. Pure reads, no VM (the accelerator probe is in
:mod:`shim.platform.accel`).

Each probe returns a :class:`Finding` (ok / warning / failure plus a one-line human reason) so that
``pyvm check`` can print them and the VM driver can refuse to start with the same words.
"""

from __future__ import annotations

import enum
import os
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from shim.errors import FailedPrecondition


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    name: str
    level: Level
    detail: str

    @property
    def ok(self) -> bool:
        return self.level is not Level.FAIL


@dataclass(frozen=True)
class QemuInfo:
    path: Path
    version: str  # "7.2.22"
    banner: str  # first line of --version

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])


#: oldest QEMU we support: virtio-mem on arm64 and `-accel tcg,thread=multi` with memfd backends
MIN_QEMU = (7, 0)


@lru_cache(maxsize=16)
def _qemu_version(path: str, mtime_ns: int) -> QemuInfo:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(
            f"QEMU {path} cannot be run: {exc}", key="hypervisor.path", value=path
        ) from exc
    banner = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", banner)
    if out.returncode != 0 or not m:
        raise FailedPrecondition(
            f"QEMU {path} --version failed (exit {out.returncode}): {banner or out.stderr.strip()[:200]}",
            key="hypervisor.path",
            value=path,
        )
    return QemuInfo(Path(path), m.group(1), banner)


def qemu_info(path: Path) -> QemuInfo:
    """Version of the QEMU binary at ``path``. Raises FailedPrecondition if absent or broken."""
    try:
        st = path.stat()
    except OSError as exc:
        raise FailedPrecondition(
            f"QEMU binary {path} (hypervisor.path) not found: install qemu-system-x86/qemu-system-arm",
            key="hypervisor.path",
            value=str(path),
        ) from exc
    if not os.access(path, os.X_OK):
        raise FailedPrecondition(
            f"QEMU binary {path} (hypervisor.path) is not executable", key="hypervisor.path"
        )
    return _qemu_version(str(path), st.st_mtime_ns)


def check_qemu(path: Path) -> Finding:
    try:
        info = qemu_info(path)
    except FailedPrecondition as exc:
        return Finding("qemu", Level.FAIL, str(exc))
    if info.version_tuple < MIN_QEMU:
        return Finding(
            "qemu", Level.FAIL, f"{path}: QEMU {info.version} is older than {'.'.join(map(str, MIN_QEMU))}"
        )
    return Finding("qemu", Level.OK, f"{path}: QEMU {info.version}")


def check_file(name: str, key: str, path: Path | None, *, required: bool = True, hint: str = "") -> Finding:
    """A file the configuration names: present and readable?"""
    if path is None:
        return Finding(name, Level.OK, f"{key} not set")
    if path.is_file() and os.access(path, os.R_OK):
        return Finding(name, Level.OK, f"{path} ({path.stat().st_size} bytes)")
    level = Level.FAIL if required else Level.WARN
    return Finding(name, level, f"{key} = {path}: not found{'; ' + hint if hint else ''}")


def check_executable(name: str, key: str, path: Path) -> Finding:
    if path.is_file() and os.access(path, os.X_OK):
        return Finding(name, Level.OK, str(path))
    return Finding(name, Level.FAIL, f"{key} = {path}: not found or not executable")


def check_cgroup2(root: Path = Path("/sys/fs/cgroup")) -> Finding:
    ctl = root / "cgroup.controllers"
    if not ctl.exists():
        # QEMU and virtiofsd run in the cgroup containerd gives the shim; pyvm itself manages no host
        # cgroup, so a v1/hybrid host works (guest cgroups are v2 inside the VM regardless)
        hybrid = (root / "unified" / "cgroup.controllers").exists()
        kind = "hybrid (v1 controllers + v2 at unified/)" if hybrid else "v1"
        return Finding("cgroups", Level.WARN, f"host cgroups are {kind} at {root}: supported, v2 recommended")
    controllers = ctl.read_text().split()
    missing = [c for c in ("cpu", "memory", "pids") if c not in controllers]
    if missing:
        return Finding(
            "cgroups", Level.WARN, f"cgroup v2 at {root}, controllers missing: {', '.join(missing)}"
        )
    return Finding("cgroups", Level.OK, f"cgroup v2 at {root} ({' '.join(controllers)})")


def check_dev_kvm(path: Path = Path("/dev/kvm")) -> Finding:
    """Presence of /dev/kvm only; whether KVM really works is the accelerator probe's question."""
    if not path.exists():
        return Finding("/dev/kvm", Level.WARN, f"{path} absent: VMs will run under TCG (slow)")
    if not os.access(path, os.R_OK | os.W_OK):
        return Finding("/dev/kvm", Level.WARN, f"{path} present but not read-write for this user")
    return Finding("/dev/kvm", Level.OK, f"{path} present (usability decided by the accelerator probe)")


def kvm_usable_device(path: Path = Path("/dev/kvm")) -> bool:
    return path.exists() and os.access(path, os.R_OK | os.W_OK)


__all__ = [
    "Finding",
    "Level",
    "MIN_QEMU",
    "QemuInfo",
    "check_cgroup2",
    "check_dev_kvm",
    "check_executable",
    "check_file",
    "check_qemu",
    "kvm_usable_device",
    "qemu_info",
]
