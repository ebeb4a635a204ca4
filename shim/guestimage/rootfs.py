"""The base root filesystem layer: a debootstrap'd Debian bookworm minbase with python3 and crun.

This is the slow layer (minutes; arm64 runs its second stage under qemu-user), so it is cached under
``<cache>/<arch>/base-<key>/`` by its own input key and reused by every final assembly: an agent
code change never re-runs debootstrap. The key covers the suite, the package list, the trim rules
(``BASE_LAYER_VERSION``) and the candidate versions of the explicitly included packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition
from shim.guestimage import apt
from shim.guestimage.arch import Arch
from shim.guestimage.proc import need_tool, run
from shim.guestimage.progress import Progress

#: bump when the debootstrap invocation or the trim rules change
BASE_LAYER_VERSION = 2
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
#: debootstrap installs the release suite only; these are applied on top (``apt-get upgrade``)
SOURCES_LIST = f"""deb {MIRROR} {SUITE} main
deb {MIRROR} {SUITE}-updates main
deb http://deb.debian.org/debian-security {SUITE}-security main
"""
#: beyond minbase (which already has util-linux/mount, coreutils, dash)
INCLUDE = ("python3", "crun", "kmod", "iproute2", "ca-certificates")
#: directories dropped from the image (docs, man pages, locales, apt state); relative to the root
TRIM_DIRS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bash-completion",
    "usr/share/common-licenses",
    "usr/share/perl5",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/turtledemo",
    "var/cache/apt",
    "var/cache/debconf",
    "var/lib/apt/lists",
    "var/log",
    "debootstrap",
)
TRIM_GLOBS = ("usr/lib/*/perl-base", "usr/lib/*/perl", "usr/bin/perl*")


@dataclass(frozen=True)
class BaseLayer:
    root: Path
    key: str
    packages: list[str]  # "name=version" as dpkg recorded them


def base_key(arch: Arch, pins: list[apt.Package]) -> str:
    doc = {
        "version": BASE_LAYER_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "arch": arch.deb,
        "include": list(INCLUDE),
        "trim": [*TRIM_DIRS, *TRIM_GLOBS],
        "pins": sorted(p.pin for p in pins),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def resolve_pins(arch: Arch) -> list[apt.Package]:
    """Candidate versions of the explicitly included packages (they enter the base key)."""
    found = apt.candidates(list(INCLUDE), arch)
    return [found[name][0] for name in INCLUDE]


def ensure_binfmt(arch: Arch) -> None:
    """Make the kernel run ``arch`` binaries through qemu-user-static (for debootstrap's 2nd stage).

    :raises FailedPrecondition: when binfmt_misc or qemu-user-static is not usable.
    """
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], check=False)
    entry = misc / arch.binfmt
    if not entry.exists() or "enabled" not in entry.read_text():
        need_tool("update-binfmts", "binfmt-support")
        need_tool(f"{arch.binfmt}-static", "qemu-user-static")
        subprocess.run(["update-binfmts", "--enable", arch.binfmt], check=False)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise FailedPrecondition(
            f"binfmt_misc entry {arch.binfmt} is not enabled: apt-get install qemu-user-static binfmt-support"
            f" && update-binfmts --enable {arch.binfmt}"
        )


def _trim(root: Path) -> None:
    for rel in TRIM_DIRS:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
    for pattern in TRIM_GLOBS:
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    (root / "var" / "log").mkdir(exist_ok=True)
    (root / "usr" / "share" / "locale").mkdir(exist_ok=True)
    # machine-specific files debootstrap leaves behind (resolv.conf is the build host's)
    for rel in ("etc/machine-id", "var/lib/dbus/machine-id", "etc/hostname", "etc/resolv.conf"):
        p = root / rel
        if p.exists():
            p.write_text("")


def _upgrade(root: Path, env: dict[str, str]) -> None:
    """Bring the release-suite packages up to the point-release and security updates."""
    (root / "etc" / "apt" / "sources.list").write_text(SOURCES_LIST)
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    opts = ["-o", "Acquire::Languages=none", "-o", "APT::Sandbox::User=root"]
    run(["chroot", root, "apt-get", *opts, "-qq", "update"], env=env)
    run(
        ["chroot", root, "apt-get", *opts, "-y", "-qq", "-o", "Dpkg::Options::=--force-confold", "upgrade"],
        env=env,
    )
    run(["chroot", root, "apt-get", "clean"], env=env)


def _packages(root: Path) -> list[str]:
    out = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}=${Version}\n"])
    return sorted(line for line in out.splitlines() if line)


def build_base(
    arch: Arch, cache: Path, progress: Progress, pins: list[apt.Package] | None = None
) -> BaseLayer:
    """The cached base layer for ``arch``, debootstrapping it first if absent.

    :raises FailedPrecondition: when debootstrap or qemu-user-static is missing.
    :raises Internal: when debootstrap fails (the output tail is in the message).
    """
    if pins is None:
        with progress.step("resolving base package versions"):
            pins = resolve_pins(arch)
    key = base_key(arch, pins)
    layer_dir = cache / arch.name / f"base-{key}"
    meta = layer_dir / "base.json"
    if meta.exists():
        progress.say(f"base rootfs cached ({layer_dir})")
        data = json.loads(meta.read_text())
        return BaseLayer(layer_dir / "rootfs", key, data["packages"])

    debootstrap = need_tool("debootstrap", "debootstrap")
    tmp = layer_dir.with_name(layer_dir.name + ".tmp")
    if tmp.exists():
        unmount_under(tmp)
        shutil.rmtree(tmp)
    try:
        return _debootstrap(arch, cache, progress, pins, key, tmp, layer_dir, debootstrap)
    finally:
        # debootstrap mounts proc/sys (and may bind /dev) in the target; never leave them behind
        unmount_under(tmp)


def unmount_under(path: Path) -> None:
    """Unmount every mount at or below ``path``, deepest first (so rmtree never walks into /dev)."""
    prefix = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    for point in sorted(set(inside), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _debootstrap(
    arch: Arch,
    cache: Path,
    progress: Progress,
    pins: list[apt.Package],
    key: str,
    tmp: Path,
    layer_dir: Path,
    debootstrap: str,
) -> BaseLayer:
    root = tmp / "rootfs"
    root.mkdir(parents=True)
    debs = (cache / "debs" / arch.deb).resolve()
    debs.mkdir(parents=True, exist_ok=True)
    argv: list[str | Path] = [
        debootstrap,
        "--variant=minbase",
        f"--arch={arch.deb}",
        f"--include={','.join(INCLUDE)}",
        f"--cache-dir={debs}",
    ]
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    if arch.is_native:
        with progress.step(f"debootstrap {SUITE} minbase ({arch.deb})"):
            run([*argv, SUITE, root, MIRROR], env=env)
    else:
        ensure_binfmt(arch)
        with progress.step(f"debootstrap --foreign {SUITE} minbase ({arch.deb})"):
            run([*argv, "--foreign", SUITE, root, MIRROR], env=env)
        with progress.step(f"debootstrap second stage under {arch.binfmt} (slow)"):
            run(["chroot", root, "/debootstrap/debootstrap", "--second-stage"], env=env)
    with progress.step(f"apt-get upgrade from {SUITE}-updates and {SUITE}-security"):
        _upgrade(root, env)
    packages = _packages(root)
    with progress.step("trimming docs, man pages, locales, apt state"):
        _trim(root)
    (tmp / "base.json").write_text(
        json.dumps(
            {"key": key, "arch": arch.name, "pins": [p.pin for p in pins], "packages": packages}, indent=1
        )
    )
    unmount_under(tmp)
    if layer_dir.exists():
        shutil.rmtree(layer_dir)
    tmp.rename(layer_dir)
    for old in (cache / arch.name).glob("base-*"):  # superseded layers (other keys)
        if old != layer_dir and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return BaseLayer(layer_dir / "rootfs", key, packages)
