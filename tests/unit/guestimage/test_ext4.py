from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shim.guestimage.ext4 import clamp_inode_times

MKFS = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin") or ""
UUID = "11111111-2222-3333-4444-555555555555"


def _image(tmp_path: Path, name: str, features: str = "^has_journal,^metadata_csum") -> Path:
    src = tmp_path / f"src-{name}"
    (src / "usr" / "lib").mkdir(parents=True)
    (src / "usr" / "lib" / "a.py").write_text("x = 1\n")
    os.symlink("usr/lib", src / "lib")
    # mtimes are kept (only atime/ctime/crtime are clamped): fix them all, or two copies made on
    # either side of a second boundary differ (the directories' mtimes are "now")
    for p in (src / "usr" / "lib" / "a.py", src / "usr" / "lib", src / "usr", src):
        os.utime(p, (1_600_000_000, 1_600_000_000))
    out = tmp_path / f"{name}.img"
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1704067200"}
    subprocess.run(
        [
            MKFS,
            "-q",
            "-F",
            "-L",
            "t",
            "-U",
            UUID,
            "-O",
            features,
            "-E",
            f"hash_seed={UUID}",
            "-d",
            src,
            out,
            "8M",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    return out


@pytest.mark.skipif(not MKFS, reason="mkfs.ext4 missing (apt-get install e2fsprogs)")
def test_two_copies_of_a_tree_give_identical_images_after_clamping(tmp_path: Path) -> None:
    a = _image(tmp_path, "a")
    b = _image(tmp_path, "b")  # a fresh copy: other ctimes
    assert clamp_inode_times(a, 1704067200) > 3
    clamp_inode_times(b, 1704067200)
    assert a.read_bytes() == b.read_bytes()
    fsck = subprocess.run(["e2fsck", "-fn", a], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    stat = subprocess.run(["debugfs", "-R", "stat /usr/lib/a.py", a], capture_output=True, text=True).stdout
    assert "0x5f5e1000" in stat  # mtime 1600000000 kept


@pytest.mark.skipif(not MKFS, reason="mkfs.ext4 missing (apt-get install e2fsprogs)")
def test_metadata_csum_images_are_refused(tmp_path: Path) -> None:
    img = _image(tmp_path, "c", features="^has_journal")
    with pytest.raises(ValueError, match="metadata_csum"):
        clamp_inode_times(img, 0)
