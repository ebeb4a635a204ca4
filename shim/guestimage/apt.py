"""Debian packages through the host's apt: resolve the candidate version, download, unpack.

Versions are resolved once per build and then pinned (``apt-get download pkg:arch=version``), so the
build hash and the manifest name exactly what went in.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition
from shim.guestimage.arch import Arch
from shim.guestimage.proc import need_tool, run


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str  # Debian arch of the .deb (amd64, arm64, all)

    @property
    def pin(self) -> str:
        return f"{self.name}={self.version}"

    def deb_filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _host_deb_arch() -> str:
    return run(["dpkg", "--print-architecture"]).strip()


def ensure_arch(arch: Arch) -> None:
    """Make apt know ``arch`` (``dpkg --add-architecture`` + ``apt-get update``), idempotently."""
    if arch.deb == _host_deb_arch():
        return
    foreign = run(["dpkg", "--print-foreign-architectures"]).split()
    if arch.deb not in foreign:
        run(["dpkg", "--add-architecture", arch.deb])
        run(["apt-get", "update", "-qq"])


def _show(specs: list[str]) -> dict[str, dict[str, str]]:
    """``apt-cache show`` of the candidates of ``specs`` (one call: apt-cache is slow to start)."""
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *specs],
        capture_output=True,
        text=True,
        check=False,
    )
    found: dict[str, dict[str, str]] = {}
    for stanza in proc.stdout.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if not line or line[0].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key, value.strip())
        if "Package" in fields:
            found.setdefault(fields["Package"], fields)
    return found


def candidates(names: list[str], arch: Arch) -> dict[str, tuple[Package, dict[str, str]]]:
    """The candidate version of each of ``names`` for ``arch`` (runs ``apt-get update`` once if needed).

    :raises FailedPrecondition: when apt does not know a package.
    """

    def lookup() -> dict[str, dict[str, str]]:
        found = _show([f"{n}:{arch.deb}" for n in names])
        rest = [n for n in names if n not in found]
        if rest:  # Architecture: all packages answer only to their bare name
            found.update((k, v) for k, v in _show(rest).items() if v.get("Architecture") in ("all", arch.deb))
        return found

    found = lookup()
    if any(n not in found for n in names):
        run(["apt-get", "update", "-qq"])
        found = lookup()
    missing = [n for n in names if n not in found]
    if missing:
        raise FailedPrecondition(
            f"apt knows no package {', '.join(missing)} for {arch.deb}; check /etc/apt/sources.list",
            packages=missing,
        )
    result = {}
    for n in names:
        f = found[n]
        result[n] = (Package(f["Package"], f["Version"], f.get("Architecture", arch.deb)), f)
    return result


def lists_stamp() -> str:
    """Changes whenever apt's view of the archive may have changed (``apt-get update``, sources, pins)."""
    h = hashlib.sha256()
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list.d"), Path("/etc/apt/preferences.d")):
        if d.is_dir():
            for p in sorted(d.iterdir()):
                st = p.stat()
                h.update(f"{p}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    for f in (Path("/etc/apt/sources.list"), Path("/var/lib/dpkg/arch")):
        if f.exists():
            h.update(f"{f}:{f.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()


def candidate(name: str, arch: Arch) -> tuple[Package, dict[str, str]]:
    return candidates([name], arch)[name]


def resolve_kernel(arch: Arch) -> Package:
    """The concrete ``linux-image-<abi>-cloud-<arch>`` package the cloud metapackage pins."""
    _, fields = candidate(arch.kernel_meta, arch)
    pkg, _ = candidate(kernel_package_name(fields), arch)
    return pkg


def kernel_package_name(meta_fields: dict[str, str]) -> str:
    """The concrete image package from the metapackage's first Depends entry."""
    first = meta_fields.get("Depends", "").split(",")[0].split("|")[0].strip()
    name = first.split(" ")[0].split(":")[0]
    if not name.startswith("linux-image-"):
        raise FailedPrecondition(
            f"cannot read the kernel package from the cloud metapackage Depends: {first!r}"
        )
    return name


def download(pkg: Package, arch: Arch, cache: Path) -> Path:
    """The .deb of exactly ``pkg`` in ``cache`` (downloaded once)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / pkg.deb_filename()
    if not path.exists():
        need_tool("apt-get", "apt")
        run(["apt-get", "download", "-q", f"{pkg.name}:{arch.deb}={pkg.version}"], cwd=cache)
        if not path.exists():
            raise FailedPrecondition(f"apt-get download did not produce {path.name}", package=pkg.pin)
    return path


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files (no maintainer scripts) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest], env={**os.environ, "LC_ALL": "C"})
