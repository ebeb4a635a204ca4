"""VM templates on disk: where they live, what identifies them, and moving guest RAM in and out.

A template is one VM booted to agent-ready with ``Boot.TEMPLATE`` and saved: QEMU's device state
(``state``, a migration stream written with ``x-ignore-shared``, so it holds no guest RAM) and the
guest RAM itself (``ram``, a sparse file of ``default_memory`` MiB holding only the pages the guest
touched). A pod VM started with ``Boot.RESTORE`` copies ``ram`` into a fresh memfd, lets QEMU load
``state`` and runs on: no firmware, no kernel boot, no Python start in the guest.

The key: a hash of the template VM's command line (rendered for a fixed, placeholder sandbox
directory, so it holds every device, size and kernel parameter but no per-pod path) and of the
identity (resolved path, size, mtime) of every file the VM reads at boot: QEMU, firmware, kernel,
initrd, root disk. Anything that changes the VM's devices or its guest image gives another key, so
a stale template is never restored; it is simply not found.

Layout: ``<template_path>/<arch>/<key>/{state,ram,meta.json}``; a template being built lives in a
``.<key>.tmp-<pid>`` sibling and is renamed into place when complete; ``.<key>.lock`` serializes
builders of one key. A template whose restore failed is moved aside to ``.<key>.bad-<time>``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim import __version__
from shim.config import Config
from shim.errors import FailedPrecondition
from shim.hypervisor.qemu.cmdline import Boot, vm_command
from shim.log import get_logger
from shim.paths import SandboxDir

log = get_logger("pyvm.hypervisor.template")

#: bumped when the layout or the way templates are made changes incompatibly
FORMAT = 1
MiB = 1024 * 1024
_REF_ROOT = Path("/pyvm-template")


@dataclass(frozen=True)
class Template:
    """One complete template directory."""

    dir: Path
    key: str

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"

    def info(self) -> dict[str, object]:
        """meta.json plus what the files take on disk."""
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            meta = {}
        used = 0
        for f in (self.state, self.ram):
            with contextlib.suppress(OSError):
                used += f.stat().st_blocks * 512
        return {**meta, "key": self.key, "dir": str(self.dir), "disk_bytes": used}


def arch_dir(cfg: Config) -> Path:
    return cfg.factory.template_path / cfg.hypervisor.arch


def _identity(path: Path | None) -> list[object] | None:
    if path is None:
        return None
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except OSError:
        return [str(path), None]
    return [str(real), st.st_size, st.st_mtime_ns]


def key_material(cfg: Config, accel: str, extra_kernel_params: Sequence[str] = ()) -> dict[str, object]:
    """What a template's key is the hash of (kept in meta.json, so a mismatch can be explained)."""
    hv = cfg.hypervisor
    ref = SandboxDir.for_sandbox("template", _REF_ROOT)
    argv = vm_command(
        cfg,
        ref,
        accel,
        extra_kernel_params=extra_kernel_params,
        boot=Boot.TEMPLATE,
        ram_path=_REF_ROOT / "ram",
    ).argv()
    files = [hv.path, hv.kernel, hv.initrd, hv.image, *hv.pflashes]
    return {
        "format": FORMAT,
        "accel": accel,
        "argv": argv,
        "files": [_identity(f) for f in files],
        "virtiofs": cfg.shared_fs.kind == "virtio-fs",
    }


def template_key(cfg: Config, accel: str, extra_kernel_params: Sequence[str] = ()) -> str:
    raw = json.dumps(key_material(cfg, accel, extra_kernel_params), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:20]


def find(cfg: Config, accel: str, extra_kernel_params: Sequence[str] = ()) -> Template | None:
    """The complete template for this VM, or None (none built, or built for something else)."""
    key = template_key(cfg, accel, extra_kernel_params)
    t = Template(arch_dir(cfg) / key, key)
    try:
        meta = json.loads(t.meta.read_text())
        if meta.get("format") != FORMAT or not t.state.is_file() or not t.ram.is_file():
            return None
    except (OSError, ValueError):
        return None
    return t


def list_templates(cfg: Config) -> list[Template]:
    root = arch_dir(cfg)
    try:
        return sorted(
            (Template(d, d.name) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
            key=lambda t: t.key,
        )
    except OSError:
        return []


def quarantine(t: Template, reason: str) -> Path | None:
    """Move a template that failed to restore out of the way (kept for inspection, never used)."""
    dest = t.dir.parent / f".{t.key}.bad-{int(time.time())}"
    try:
        os.rename(t.dir, dest)
    except OSError as exc:
        log.error("cannot move a bad template aside", template=str(t.dir), error=str(exc))
        return None
    with contextlib.suppress(OSError):
        (dest / "why").write_text(reason + "\n")
    log.error("VM template moved aside after a failed restore", template=str(dest), reason=reason)
    return dest


@contextlib.contextmanager
def build_lock(cfg: Config, key: str) -> Iterator[None]:
    """Exclusive per-key lock of the template store (blocks while another builder holds it)."""
    root = arch_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def staging_dir(cfg: Config, key: str) -> Path:
    d = arch_dir(cfg) / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, mode=0o700)
    return d


def publish(staging: Path, cfg: Config, key: str, meta: dict[str, object]) -> Template:
    """Write meta.json, sync, and rename the staging directory to the template's place."""
    meta = {**meta, "format": FORMAT, "key": key, "pyvm": __version__, "created": time.time()}
    (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    for f in ("state", "ram", "meta.json"):
        fd = os.open(staging / f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    final = arch_dir(cfg) / key
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    return Template(final, key)


# -- guest RAM ----------------------------------------------------------------------------------------


def new_ram_fd(size_mib: int, name: str = "pyvm-ram") -> int:
    """A close-on-exec memfd of ``size_mib`` MiB (all holes): a VM's boot RAM, handed to QEMU."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size_mib * MiB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent of ``fd`` (SEEK_DATA/SEEK_HOLE), holes skipped."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        off = end


def copy_data(src: int, dst: int) -> int:
    """Copy the data extents of ``src`` into ``dst`` at the same offsets (``dst`` is at least as big;
    its holes stay holes). Returns the bytes copied. In-kernel copies only: copy_file_range, or
    sendfile across filesystems (ext4 <-> the memfd's tmpfs)."""
    size = os.fstat(src).st_size
    if os.fstat(dst).st_size < size:
        os.ftruncate(dst, size)
    copied = 0
    cross_fs = False
    for start, length in _extents(src, size):
        pos, left = start, length
        while left:
            n = 0
            if not cross_fs:
                try:
                    n = os.copy_file_range(src, dst, left, pos, pos)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    cross_fs = True
            if cross_fs:
                os.lseek(dst, pos, os.SEEK_SET)
                n = os.sendfile(dst, src, pos, left)
            if n <= 0:
                raise OSError(errno.EIO, f"short copy at offset {pos} ({left} bytes left)")
            pos += n
            left -= n
            copied += n
    return copied


def load_ram(t: Template, fd: int) -> int:
    """Fill the memfd ``fd`` with the template's guest RAM. Returns the bytes copied."""
    try:
        src = os.open(t.ram, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the VM template's RAM {t.ram}: {exc.strerror}") from exc
    try:
        return copy_data(src, fd)
    finally:
        os.close(src)


def save_ram(fd: int, dest: Path) -> int:
    """Write the guest RAM in memfd ``fd`` to the sparse file ``dest``. Returns the bytes copied."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        return copy_data(fd, out)
    finally:
        os.close(out)


__all__ = [
    "FORMAT",
    "Template",
    "arch_dir",
    "build_lock",
    "copy_data",
    "find",
    "key_material",
    "list_templates",
    "load_ram",
    "new_ram_fd",
    "publish",
    "quarantine",
    "save_ram",
    "staging_dir",
    "template_key",
]
