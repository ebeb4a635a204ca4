"""The Debian cloud kernel: download the pinned package, unpack it once, generate modules.dep.

The kernel .deb ships no modules.dep (depmod runs in its postinst), so it is generated here with the
host's depmod, or ``busybox depmod`` when kmod is missing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition
from shim.guestimage import apt
from shim.guestimage.arch import Arch
from shim.guestimage.modules import ModuleDep
from shim.guestimage.proc import run


@dataclass(frozen=True)
class KernelTree:
    package: apt.Package
    #: the unpacked package (``boot/``, ``lib/modules/<kver>/``)
    root: Path
    kver: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.kver}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.kver

    def modules_dep(self) -> ModuleDep:
        return ModuleDep.parse((self.moddir / "modules.dep").read_text())

    def config_value(self, key: str) -> str | None:
        """``y``, ``m``, a value, or None when unset."""
        prefix = f"{key}="
        for line in self.config.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip('"')
        return None


def _depmod(root: Path, kver: str) -> None:
    depmod = shutil.which("depmod") or shutil.which("depmod", path="/usr/sbin:/sbin")
    if depmod:
        run([depmod, "-b", root, kver])
    else:
        busybox = shutil.which("busybox")
        if not busybox:
            raise FailedPrecondition("neither depmod nor busybox found: apt-get install kmod")
        run([busybox, "depmod", "-b", root, kver])


def prepare(pkg: apt.Package, arch: Arch, cache: Path) -> KernelTree:
    """Unpack ``pkg`` under ``cache/kernel/`` (once; a half-done unpack is never reused)."""
    dest = cache / "kernel" / f"{pkg.name}_{pkg.version}_{pkg.arch}"
    if not (dest / ".complete").exists():
        deb = apt.download(pkg, arch, cache / "debs")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        apt.extract(deb, tmp)
        kvers = sorted(p.name for p in (tmp / "lib" / "modules").iterdir())
        if len(kvers) != 1:
            raise FailedPrecondition(f"{deb.name} holds {len(kvers)} module trees: {kvers}")
        _depmod(tmp, kvers[0])
        (tmp / ".complete").write_text(kvers[0] + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    kver = (dest / ".complete").read_text().strip()
    return KernelTree(pkg, dest, kver)
