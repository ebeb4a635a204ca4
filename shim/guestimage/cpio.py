"""A deterministic writer of the ``newc`` cpio format the kernel unpacks as an initramfs.

Entries are written in the order given (``add_tree`` sorts), with uid/gid 0 and inode numbers
counted from 1, so the same tree always gives the same bytes. File mtimes are kept (the stdlib's
timestamp-validated .pyc files depend on them) unless the caller passes ``mtime``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._ino = 0
        self._names: set[str] = set()

    def _header(self, name: str, mode: int, size: int, mtime: int, nlink: int, rdev: tuple[int, int]) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, max(0, mtime), size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded + _pad(len(header) + len(encoded)))

    def add(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        mtime: int = 0,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        """Add one entry. ``name`` is relative ("init", "dev/console"); ``mode`` includes the file type."""
        name = name.strip("/") or "."
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        self._header(name, mode, len(data), mtime, nlink, rdev)
        self.out.write(data + _pad(len(data)))

    def add_file(self, name: str, data: bytes, perm: int = 0o644, mtime: int = 0) -> None:
        self.add(name, stat.S_IFREG | perm, data, mtime=mtime)

    def add_dir(self, name: str, perm: int = 0o755, mtime: int = 0) -> None:
        self.add(name, stat.S_IFDIR | perm, mtime=mtime)

    def add_symlink(self, name: str, target: str, mtime: int = 0) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode(), mtime=mtime)

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def add_path(self, name: str, path: Path, mtime: int | None = None) -> None:
        """Add ``path`` (file, dir, symlink, device) as ``name``; hard links become separate files."""
        st = os.lstat(path)
        m = int(st.st_mtime) if mtime is None else mtime
        if stat.S_ISREG(st.st_mode):
            self.add(name, st.st_mode, path.read_bytes(), mtime=m)
        elif stat.S_ISLNK(st.st_mode):
            self.add(name, st.st_mode, os.readlink(path).encode(), mtime=m)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            self.add(name, st.st_mode, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), mtime=m)
        else:  # directories, fifos
            self.add(name, st.st_mode, mtime=m)

    def add_tree(self, root: Path, prefix: str = "", mtime: int | None = None) -> None:
        """Add everything under ``root`` (not ``root`` itself) below ``prefix``, in sorted order."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = prefix.strip("/")
            here = base if rel == "." else (f"{base}/{rel}" if base else rel)
            if rel != "." or base:
                if here not in self._names:
                    self.add_path(here, Path(dirpath), mtime)
            for entry in sorted(
                filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            ):
                self.add_path(f"{here}/{entry}" if here else entry, Path(dirpath) / entry, mtime)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]

    def close(self) -> None:
        """Write the trailer (the writer does not own ``out``)."""
        self._header(TRAILER, 0, 0, 0, 1, (0, 0))
        self.out.write(b"")


def read_names(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse an uncompressed newc archive: ``[(name, mode, data)]`` up to the trailer (for tests)."""
    entries: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += (4 - pos % 4) % 4
        body = data[pos : pos + size]
        pos += size
        pos += (4 - pos % 4) % 4
        if name == TRAILER:
            return entries
        entries.append((name, mode, body))
