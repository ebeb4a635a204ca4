from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from shim.guestimage.cpio import CpioWriter, read_names


def _archive(tree: Path | None = None) -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("bin")
    w.add_file("bin/busybox", b"\x7fELF" + b"x" * 1001, 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_chardev("dev/console", 5, 1)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    if tree is not None:
        w.add_tree(tree, "opt")
    w.close()
    return buf.getvalue()


def test_round_trip_through_the_python_reader() -> None:
    entries = {name: (mode, data) for name, mode, data in read_names(_archive())}
    assert entries["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF" + b"x" * 1001)
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]


def test_same_input_gives_same_bytes() -> None:
    assert _archive() == _archive()


def test_duplicate_names_are_refused() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_dir("bin")
    with pytest.raises(ValueError):
        w.add_dir("bin/")


def test_add_tree_is_sorted_and_keeps_symlinks(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    os.symlink("b", tmp_path / "link")
    names = [n for n, _, _ in read_names(_archive(tmp_path))]
    assert names[-5:] == ["opt", "opt/a.txt", "opt/link", "opt/b", "opt/b/z.txt"]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed (apt-get install cpio)")
def test_gnu_cpio_lists_and_extracts_it(tmp_path: Path) -> None:
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=_archive(), capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
    out = tmp_path / "x"
    out.mkdir()
    data = io.BytesIO()
    w = CpioWriter(data)
    w.add_dir("etc")
    w.add_file("etc/modules.list", b"kernel/a.ko\n")
    w.close()
    subprocess.run(["cpio", "-id", "--quiet"], input=data.getvalue(), cwd=out, check=True)
    assert (out / "etc" / "modules.list").read_bytes() == b"kernel/a.ko\n"
