"""Pure parts of shim.resources.storage (no root, nothing mounted). Real mounts and virtiofsd:
tests/integration/test_storage_virtiofs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.paths import SandboxDir
from shim.resources import storage as st
from shim.resources.storage import RootfsMount, SandboxStorage

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 27 254:0 /run/pyvm/sbs/s1/shared /run/pyvm/sbs/s1/shared rw,relatime shared:7 - ext4 /dev/vda rw
48 45 0:42 / /run/pyvm/sbs/s1/shared/c1/rootfs rw,relatime shared:8 - overlay overlay rw,lowerdir=/a
50 45 254:0 /srv/my\040vol /run/pyvm/sbs/s1/shared/c1/mounts/3 ro,relatime shared:9 - ext4 /dev/vda rw
51 48 0:50 / /run/pyvm/sbs/s1/shared/c1/rootfs/sub rw - tmpfs tmpfs rw
52 45 0:51 / /run/pyvm/sbs/s1/shared/c1/rootfs rw - tmpfs tmpfs rw
60 27 254:0 /x /run/pyvm/sbs/s1/shared-other rw - ext4 /dev/vda rw
61 27 254:0 /y /run/pyvm/sbs/s1/shared/c2//deleted rw - ext4 /dev/vda rw
"""


def test_parse_mountinfo_fields_and_escapes() -> None:
    entries = st.parse_mountinfo(MOUNTINFO)
    assert len(entries) == 9
    vol = entries[4]
    assert (vol.mount_id, vol.parent_id, vol.root, vol.fstype) == (50, 45, "/srv/my vol", "ext4")
    assert entries[2].shared and not entries[0].shared
    assert entries[8].mount_point == "/run/pyvm/sbs/s1/shared/c2"


def test_mounts_under_is_path_prefix_not_string_prefix() -> None:
    entries = st.parse_mountinfo(MOUNTINFO)
    under = [e.mount_id for e in st.mounts_under("/run/pyvm/sbs/s1/shared", entries)]
    assert under == [45, 48, 50, 51, 52, 61]  # not 60 (shared-other)
    assert st.is_mountpoint("/run/pyvm/sbs/s1/shared/c1/rootfs", entries)
    assert not st.is_mountpoint("/run/pyvm/sbs/s1/shared/c1", entries)


def test_unmount_order_deepest_first_then_topmost_of_a_stack() -> None:
    entries = st.mounts_under("/run/pyvm/sbs/s1/shared", st.parse_mountinfo(MOUNTINFO))
    order = [e.mount_id for e in st.unmount_order(entries)]
    assert order[0] == 51  # rootfs/sub
    assert order.index(52) < order.index(48)  # the tmpfs stacked on rootfs goes before the overlay
    assert order[-1] == 45  # the share itself last


def test_parse_options() -> None:
    p = st.parse_options(["rbind", "rprivate", "ro", "nosuid", "index=off", "lowerdir=/a:/b"])
    assert p.is_bind and p.flags & st.MS_REC and p.flags & st.MS_RDONLY and p.flags & st.MS_NOSUID
    assert p.propagation == (st.MS_PRIVATE | st.MS_REC,)
    assert p.data == ("index=off", "lowerdir=/a:/b")
    assert not st.parse_options(["ro", "rw"]).flags & st.MS_RDONLY


@pytest.mark.parametrize(
    ("mount", "bind"),
    [
        ({"type": "bind", "options": ["ro"]}, True),
        ({"type": "none", "options": ["rbind"]}, True),
        ({"type": "", "options": ["bind"]}, True),
        ({"type": "tmpfs", "options": ["nosuid"]}, False),
        ({"type": "proc"}, False),
    ],
)
def test_is_bind_mount(mount: dict, bind: bool) -> None:
    assert st.is_bind_mount(mount) is bind


@pytest.fixture
def storage(tmp_path: Path) -> SandboxStorage:
    return SandboxStorage(SandboxDir.for_sandbox("sb1", base=tmp_path / "sbs"))


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (RootfsMount("overlay", "overlay", "", ("workdir=/w", "upperdir=/u")), "overlay without lowerdir"),
        (RootfsMount("overlay", "overlay", "", ("lowerdir=/does/not/exist",)), "lowerdir /does/not/exist"),
        (RootfsMount("bind", "/does/not/exist", "", ("rbind",)), "bind source"),
        (RootfsMount("", "/x", "", ()), "has no type"),
        (RootfsMount("bind", "/", "../escape", ("rbind",)), "inside the rootfs"),
    ],
)
def test_bad_rootfs_mounts_are_invalid_and_named(
    storage: SandboxStorage, mount: RootfsMount, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as exc:
        storage.mount_rootfs("c1", [mount], "/nonexistent-bundle")
    assert "container c1: rootfs mount #0" in str(exc.value)
    assert not storage.dir.root.exists(), "validation happens before anything is created"


def test_empty_rootfs_needs_a_bundle_rootfs(storage: SandboxStorage, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        storage.mount_rootfs("c1", [], tmp_path / "bundle")


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (
            {"destination": "/data", "type": "bind", "source": "/does/not/exist", "options": ["rbind"]},
            "bind mount /data: source",
        ),
        ({"destination": "/data", "type": "bind", "source": "relative", "options": ["rbind"]}, "absolute"),
        ({"destination": "data", "type": "bind", "source": "/", "options": ["rbind"]}, "destination 'data'"),
    ],
)
def test_bad_bind_mounts_are_invalid(storage: SandboxStorage, mount: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        storage.share_mounts("c1", [{"destination": "/proc", "type": "proc", "source": "proc"}, mount])


def test_invalid_container_id(storage: SandboxStorage) -> None:
    with pytest.raises(InvalidArgument):
        storage.unmount_container("../etc")


def test_unmount_of_nothing_is_a_noop(storage: SandboxStorage) -> None:
    assert storage.unmount_container("c1") == []
    assert st.cleanup_sandbox_share(storage.dir) == []
