"""Real mounts inside a sandbox share, seen through a real virtiofsd (``-o sandbox=namespace``) that was
started *before* the mounts — as in a running pod, where containers are created after the VM boots.

No VM: connecting to virtiofsd's vhost-user socket is enough for it to build its sandbox (it does so
only after the connection), and ``/proc/<pid>/mountinfo`` + ``/proc/<pid>/root`` of its sandboxed child
show what the guest would see. Needs root and /usr/lib/qemu/virtiofsd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.paths import SandboxDir
from shim.resources import storage as st
from shim.resources.storage import RootfsMount, SandboxStorage

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


class Virtiofsd:
    def __init__(self, source: Path, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={source}", "-o", "sandbox=namespace"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, (
                "virtiofsd did not create its socket"
            )
            time.sleep(0.05)
        while True:  # the socket file appears before virtiofsd listens on it
            self.conn = socket.socket(socket.AF_UNIX)
            try:
                self.conn.connect(str(sock))
                break
            except ConnectionRefusedError:
                self.conn.close()
                assert time.monotonic() < deadline, "virtiofsd refused the vhost-user connection"
                time.sleep(0.05)
        self.pid = self._sandboxed_child(deadline)

    def _sandboxed_child(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                kids = (task / "children").read_text().split()
                # the sandboxed child lives in its own mount namespace, rooted at the share
                with contextlib.suppress(OSError):
                    if kids and os.readlink(f"/proc/{kids[0]}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                        entries = st.parse_mountinfo(Path(f"/proc/{kids[0]}/mountinfo").read_text())
                        if any(e.mount_point == "/" and e.root != "/" for e in entries):  # pivot_root done
                            return int(kids[0])
            time.sleep(0.05)
        raise AssertionError("virtiofsd did not set up its sandbox")

    def mount_points(self) -> list[str]:
        return [e.mount_point for e in st.parse_mountinfo(Path(f"/proc/{self.pid}/mountinfo").read_text())]

    def view(self, rel: str) -> Path:
        """A path as virtiofsd (hence the guest) sees it, relative to the share."""
        return Path(f"/proc/{self.pid}/root") / rel

    def stop(self) -> None:
        self.conn.close()
        with_pg = self.proc.poll() is None
        if with_pg:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def sbdir(tmp_path: Path) -> Iterator[SandboxDir]:
    d = SandboxDir.for_sandbox("sb1", base=tmp_path / "sbs")
    try:
        yield d
    finally:
        st.cleanup_sandbox_share(d)
        assert st.mounts_under(tmp_path) == []


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("lower1", "lower2", "upper", "work", "volume", "bundle/rootfs"):
        out[name] = tmp_path / name
        out[name].mkdir(parents=True)
    (out["lower1"] / "from-lower1").write_text("1\n")
    (out["lower2"] / "from-lower2").write_text("2\n")
    (out["volume"] / "data").write_text("volume\n")
    (out["bundle/rootfs"] / "prepared").write_text("yes\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    return out


def overlay(layers: dict[str, Path]) -> RootfsMount:
    return RootfsMount(
        "overlay",
        "overlay",
        "",
        (
            "index=off",
            f"workdir={layers['work']}",
            f"upperdir={layers['upper']}",
            f"lowerdir={layers['lower1']}:{layers['lower2']}",
        ),
    )


@pytest.mark.skipif(not VIRTIOFSD.exists(), reason="virtiofsd is not installed")
def test_mounts_made_after_virtiofsd_started_reach_it(
    sbdir: SandboxDir, layers: dict[str, Path], tmp_path: Path
) -> None:
    storage = SandboxStorage(sbdir)
    storage.prepare_share()
    storage.prepare_share()  # idempotent
    vfs = Virtiofsd(sbdir.share, tmp_path / "vfs.sock")
    try:
        guest_root = storage.mount_rootfs("c1", [overlay(layers)], tmp_path / "bundle")
        assert guest_root == "/run/pyvm/shared/c1/rootfs"
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(tmp_path / "app.sock"))
        spec_mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/data",
                "type": "bind",
                "source": str(layers["volume"]),
                "options": ["rbind", "ro"],
            },
            {
                "destination": "/etc/hosts",
                "type": "bind",
                "source": str(tmp_path / "hosts"),
                "options": ["rbind", "rw"],
            },
            {
                "destination": "/run/app.sock",
                "type": "bind",
                "source": str(tmp_path / "app.sock"),
                "options": ["bind"],
            },
        ]
        shared = storage.share_mounts("c1", spec_mounts)
        assert shared.guest_paths == {
            "/data": "/run/pyvm/shared/c1/mounts/1",
            "/etc/hosts": "/run/pyvm/shared/c1/mounts/2",
        }
        assert [d for d, _ in shared.skipped] == ["/run/app.sock"]
        # idempotent: nothing mounted twice
        assert storage.mount_rootfs("c1", [overlay(layers)], tmp_path / "bundle") == guest_root
        assert storage.share_mounts("c1", spec_mounts) == shared
        assert len(st.mounts_under(sbdir.container_share("c1"))) == 3

        # what virtiofsd (the guest) sees
        seen = vfs.mount_points()
        assert {"/c1/rootfs", "/c1/mounts/1", "/c1/mounts/2"} <= set(seen)
        assert sorted(p.name for p in vfs.view("c1/rootfs").iterdir()) == ["from-lower1", "from-lower2"]
        assert vfs.view("c1/mounts/1/data").read_text() == "volume\n"
        assert vfs.view("c1/mounts/2").read_text() == "127.0.0.1 localhost\n"
        # read-only bind is read-only on the host side too; rw one is writable
        with pytest.raises(OSError, match="Read-only"):
            (sbdir.container_share("c1") / "mounts/1/new").write_text("x")
        (vfs.view("c1/rootfs") / "written").write_text("upper\n")
        assert (layers["upper"] / "written").read_text() == "upper\n"

        # a second container, rootfs prepared in the bundle (empty rootfs list)
        assert storage.mount_rootfs("c2", [], layers["bundle/rootfs"].parent) == "/run/pyvm/shared/c2/rootfs"
        assert vfs.view("c2/rootfs/prepared").read_text() == "yes\n"

        assert storage.unmount_container("c1")
        assert storage.unmount_container("c1") == []  # idempotent
        assert not sbdir.container_share("c1").exists()
        assert not [p for p in vfs.mount_points() if p.startswith("/c1")]
        assert (layers["volume"] / "data").exists(), "unmounting must never delete volume data"
    finally:
        vfs.stop()
    # c2 is still mounted: the crash path removes it and the share's own mount
    done = st.cleanup_sandbox_share(sbdir)
    assert os.path.realpath(sbdir.share) in done and any(p.endswith("/c2/rootfs") for p in done)
    assert not sbdir.share.exists()


@pytest.mark.skipif(not VIRTIOFSD.exists(), reason="virtiofsd is not installed")
def test_without_prepare_share_virtiofsd_does_not_see_later_mounts(
    sbdir: SandboxDir, layers: dict[str, Path], tmp_path: Path
) -> None:
    """Why prepare_share exists: with private host mounts (as on this host) later mounts stay invisible.
    On a host whose / is shared (systemd) they would propagate; the test then has nothing to show."""
    if any(e.mount_point == "/" and e.shared for e in st.read_mountinfo()):
        pytest.skip("/ is a shared mount here; propagation works without prepare_share")
    sbdir.share.mkdir(parents=True)
    vfs = Virtiofsd(sbdir.share, tmp_path / "vfs.sock")
    try:
        SandboxStorage(sbdir).mount_rootfs("c1", [overlay(layers)], tmp_path / "bundle")
        assert "/c1/rootfs" not in vfs.mount_points()
    finally:
        vfs.stop()


def test_long_overlay_options_are_compacted(sbdir: SandboxDir, tmp_path: Path) -> None:
    base = tmp_path / "snapshots-with-a-long-directory-name-like-containerd-uses"
    lowers = []
    for i in range(60):
        d = base / f"{i:03d}-{'x' * 40}" / "fs"
        d.mkdir(parents=True)
        (d / f"f{i}").write_text(str(i))
        lowers.append(str(d))
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    opts = (f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(lowers))
    assert len(",".join(opts)) > 4096
    storage = SandboxStorage(sbdir)
    storage.prepare_share()
    storage.mount_rootfs("c1", [RootfsMount("overlay", "overlay", "", opts)], tmp_path)
    assert len(list(storage.rootfs_host_path("c1").iterdir())) == 60
    storage.unmount_container("c1")


def test_failed_rootfs_mount_rolls_back(sbdir: SandboxDir, layers: dict[str, Path], tmp_path: Path) -> None:
    storage = SandboxStorage(sbdir)
    storage.prepare_share()
    bad = RootfsMount("tmpfs", "tmpfs", "", ("size=nonsense",))
    with pytest.raises(st.Internal, match="mount") as exc:
        storage.mount_rootfs("c1", [overlay(layers), bad], tmp_path)
    assert exc.value.facts["errno"] is not None
    assert st.mounts_under(sbdir.container_share("c1")) == []


def test_busy_mount_is_detached(sbdir: SandboxDir, layers: dict[str, Path], tmp_path: Path) -> None:
    storage = SandboxStorage(sbdir)
    storage.prepare_share()
    storage.mount_rootfs("c1", [overlay(layers)], tmp_path)
    busy = subprocess.Popen(["sleep", "30"], cwd=storage.rootfs_host_path("c1"))
    try:
        storage.unmount_container("c1")
        assert not sbdir.container_share("c1").exists()
    finally:
        busy.kill()
        busy.wait()
