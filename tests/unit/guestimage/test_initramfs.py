from __future__ import annotations

import io
import stat
from pathlib import Path

from shim.guestimage import initramfs
from shim.guestimage.apt import Package
from shim.guestimage.cpio import read_names
from shim.guestimage.kernel import KernelTree


def _kernel(tmp_path: Path) -> KernelTree:
    kver = "6.1.0-56-cloud-amd64"
    moddir = tmp_path / "lib" / "modules" / kver
    for rel in (
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/fs/fuse/fuse.ko",
    ):
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(b"ko:" + rel.encode())
    (moddir / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/fs/fuse/fuse.ko:\n"
    )
    return KernelTree(Package("linux-image-" + kver, "6.1.192-2", "amd64"), tmp_path, kver)


def test_floor_has_init_console_busybox_and_modules_in_order(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    buf = io.BytesIO()
    order = initramfs.write_busybox_initramfs(
        buf,
        busybox=busybox,
        applets=["sh", "mount"],
        kernel=_kernel(tmp_path),
        modules=initramfs.FLOOR_MODULES,  # virtio_console etc. are missing here: skipped
        init=initramfs.FLOOR_INIT,
        mtime=0,
    )
    assert order == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/fs/fuse/fuse.ko",
    ]
    entries = {name: (mode, data) for name, mode, data in read_names(buf.getvalue())}
    assert entries["init"][0] == stat.S_IFREG | 0o755
    assert b"PYVM-FLOOR-READY" in entries["init"][1] and b"@@RC=$?" in entries["init"][1]
    assert b"pyvm.floor=poweroff" in entries["init"][1]
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert entries["etc/modules.list"][1].decode().split() == order
    assert entries["lib/modules/kernel/fs/fuse/fuse.ko"][1] == b"ko:kernel/fs/fuse/fuse.ko"


def test_disk_init_finds_the_root_by_label_and_switches_root() -> None:
    assert f"LABEL={initramfs.ROOT_LABEL}" in initramfs.DISK_INIT
    assert "exec switch_root /newroot /opt/pyvm/bin/pyvm-init" in initramfs.DISK_INIT


def test_gzip_is_deterministic() -> None:
    assert initramfs.compress(b"x" * 1000, "gzip") == initramfs.compress(b"x" * 1000, "gzip")
