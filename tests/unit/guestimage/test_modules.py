from __future__ import annotations

import pytest

from shim.errors import NotFound
from shim.guestimage.modules import ModuleDep, module_name

# a trimmed copy of the 6.1 cloud kernel's modules.dep (depmod lists dependencies closest-first)
FIXTURE = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def test_dependencies_come_first_right_to_left_without_duplicates() -> None:
    order = ModuleDep.parse(FIXTURE).load_order(["virtio_pci", "virtio_console", "virtiofs", "virtio_net"])
    names = [module_name(p) for p in order]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_console",
        "fuse",
        "virtiofs",
        "failover",
        "net_failover",
        "virtio_net",
    ]


def test_every_module_follows_all_of_its_dependencies() -> None:
    dep = ModuleDep.parse(FIXTURE)
    order = dep.load_order(["virtio_net", "virtiofs", "virtio_pci"])
    for path in order:
        for d in dep.entries[module_name(path)][1]:
            assert order.index(d) < order.index(path)


def test_unknown_module_raises_unless_missing_ok() -> None:
    dep = ModuleDep.parse(FIXTURE)
    with pytest.raises(NotFound):
        dep.load_order(["virtio_mem"])
    assert dep.load_order(["virtio_mem", "fuse"], missing_ok=True) == ["kernel/fs/fuse/fuse.ko"]


def test_module_name_folds_dashes_and_compression_suffixes() -> None:
    assert module_name("kernel/fs/fuse/virtiofs.ko") == "virtiofs"
    assert module_name("kernel/x/nf-nat.ko.xz") == "nf_nat"
    assert "nf-nat" not in ModuleDep.parse(FIXTURE)
