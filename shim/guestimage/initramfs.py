"""The initramfs images: the busybox "floor", the small disk-root init, and the whole-rootfs one.

Floor contract (the QEMU driver's test guest relies on it): ``/init`` mounts proc, sys and devtmpfs,
insmods the virtio modules in modules.dep order, prints ``PYVM-FLOOR-READY <uptime-seconds>``, then
powers off when the kernel command line has ``pyvm.floor=poweroff``; otherwise it runs a line shell on
the console: for each line read, eval it, print ``@@RC=<exit status>``. Echo is turned off
(``stty -echo``) *before* the marker, so a host may send its first line as soon as it sees it.
"""

from __future__ import annotations

import gzip
import io
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from shim.guestimage.cpio import CpioWriter
from shim.guestimage.kernel import KernelTree

#: loaded by the floor: enough for virtio-serial, virtio-blk, virtio-mem and virtio-fs tests
FLOOR_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_mem",
    "virtio_balloon",
    "virtio_net",
    "fuse",
    "virtiofs",
)
#: loaded by the agent guest's init (the agent may modprobe more from /lib/modules)
AGENT_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_mem",
    "virtio_net",
    "fuse",
    "virtiofs",
    "overlay",
)
#: loaded by pyvm-init before it starts the agent (the agent port); the rest of AGENT_MODULES load
#: at idle priority meanwhile (guest_init.py)
AGENT_EARLY_MODULES = ("virtio_pci", "virtio_console")
#: loaded by the disk layout's initramfs before it can mount the root disk
DISK_INIT_MODULES = ("virtio_pci", "virtio_blk", "overlay")
ROOT_LABEL = "pyvm-root"
#: the applets linked in the floor (busybox runs any other as ``busybox NAME``)
MIN_APPLETS = ("sh", "mount", "insmod", "cat", "echo", "stty", "poweroff", "sleep", "mkdir", "findfs")

FLOOR_INIT = """#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m"; done </etc/modules.list
# echo off before the marker: a host may type as soon as it sees it
stty -echo 2>/dev/null
read -r up _ </proc/uptime
echo "PYVM-FLOOR-READY $up"
case " $(cat /proc/cmdline) " in *" pyvm.floor=poweroff "*) poweroff -f ;; esac
while IFS= read -r line; do
  eval "$line"
  echo "@@RC=$?"
done
poweroff -f
"""

DISK_INIT = f"""#!/bin/sh
# Finds the read-only root disk by its label, stacks a tmpfs overlay on it and switches to it.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m"; done </etc/modules.list
n=0
until dev=$(findfs LABEL={ROOT_LABEL} 2>/dev/null); do
  n=$((n+1))
  if [ $n -gt 500 ]; then echo "pyvm-init: no disk labelled {ROOT_LABEL}"; poweroff -f; fi
  usleep 10000
done
mkdir -p /lower /rw /newroot
mount -t ext4 -o ro,noload "$dev" /lower || {{ echo "pyvm-init: cannot mount $dev"; poweroff -f; }}
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /opt/pyvm/bin/pyvm-init
"""


def busybox_applets(busybox: Path) -> list[str]:
    """Every applet name, from ``busybox --list`` (needs binfmt for a foreign busybox)."""
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
        names = [n for n in out.split() if n and "/" not in n and n != "busybox"]
        return names or list(MIN_APPLETS)
    except (OSError, subprocess.CalledProcessError):
        return list(MIN_APPLETS)


def write_busybox_initramfs(
    out: BinaryIO,
    *,
    busybox: Path,
    applets: Iterable[str],
    kernel: KernelTree,
    modules: Iterable[str],
    init: str,
    mtime: int,
) -> list[str]:
    """A busybox initramfs with ``modules`` (and their deps) and ``init`` as /init.

    :returns: the module paths in load order (also written to /etc/modules.list).
    """
    order = kernel.modules_dep().load_order(modules, missing_ok=True)
    w = CpioWriter(out)
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "sbin", "tmp", "run", "root"):
        w.add_dir(d, mtime=mtime)
    w.add_chardev("dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, perm=0o666)
    w.add_file("bin/busybox", busybox.read_bytes(), 0o755, mtime=mtime)
    for name in sorted(set(applets)):
        w.add_symlink(f"bin/{name}", "busybox", mtime=mtime)
    added: set[str] = set()
    for rel in order:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in added:
                added.add(d)
                w.add_dir(d, mtime=mtime)
        w.add_file(f"lib/modules/{rel}", (kernel.moddir / rel).read_bytes(), 0o644, mtime=mtime)
    w.add_file("etc/modules.list", "".join(f"{m}\n" for m in order).encode(), mtime=mtime)
    w.add_file("init", init.encode(), 0o755, mtime=mtime)
    w.close()
    return order


def compress(raw: bytes, method: str) -> bytes:
    """``gzip`` (deterministic: no name, mtime 0) or ``zstd`` (decompresses faster under TCG)."""
    if method == "gzip":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(raw)
        return buf.getvalue()
    if method == "zstd":
        return subprocess.run(
            ["zstd", "-q", "-c", "-T0", "-10", "--no-check"], input=raw, capture_output=True, check=True
        ).stdout
    raise ValueError(f"unknown compression {method}")


def write_tree_initramfs(out: BinaryIO, root: Path) -> None:
    """A whole root filesystem as an initramfs (layout "initramfs"); /init must already be in it."""
    w = CpioWriter(out)
    w.add_tree(root)
    if not (root / "dev" / "console").exists():
        try:
            w.add_chardev("dev/console", 5, 1)
        except ValueError:
            pass
    w.close()
