"""Make an ext4 image built by ``mke2fs -d`` byte-for-byte reproducible.

``mke2fs -d`` (e2fsprogs 1.47.0, Debian 12) copies each source file's atime and ctime into its inode,
and ctime is whatever moment the staging copy was made. ``E2FSPROGS_FAKE_TIME`` fixes only the
superblock. This rewrites atime, ctime and crtime of every in-use inode to one epoch, in place.
mtimes stay (the stdlib's timestamp-validated .pyc files depend on them). The image must be made
without ``metadata_csum`` (inode checksums would need updating); group descriptor checksums do not
cover inode tables, so they stay valid.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

EXT4_MAGIC = 0xEF53
INCOMPAT_64BIT = 0x80
RO_COMPAT_METADATA_CSUM = 0x400
BG_INODE_UNINIT = 0x1


def clamp_inode_times(image: Path, epoch: int) -> int:
    """Set atime/ctime/crtime of every used inode in ``image`` to ``epoch``; return how many.

    :raises ValueError: not an ext4 image, or one with metadata_csum.
    """
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        sb = 1024
        (magic,) = struct.unpack_from("<H", m, sb + 0x38)
        if magic != EXT4_MAGIC:
            raise ValueError(f"{image} is not an ext2/3/4 image")
        (ro_compat,) = struct.unpack_from("<I", m, sb + 0x64)
        if ro_compat & RO_COMPAT_METADATA_CSUM:
            raise ValueError(f"{image} has metadata_csum: make it with -O ^metadata_csum")
        (inodes_count,) = struct.unpack_from("<I", m, sb)
        first_data_block, log_bs = struct.unpack_from("<II", m, sb + 0x14)
        (inodes_per_group,) = struct.unpack_from("<I", m, sb + 0x28)
        (inode_size,) = struct.unpack_from("<H", m, sb + 0x58)
        (incompat,) = struct.unpack_from("<I", m, sb + 0x60)
        (desc_size,) = struct.unpack_from("<H", m, sb + 0xFE)
        bs = 1024 << log_bs
        if not incompat & INCOMPAT_64BIT or desc_size < 32:
            desc_size = 32
        groups = (inodes_count + inodes_per_group - 1) // inodes_per_group
        gdt = (first_data_block + 1) * bs
        touched = 0
        for g in range(groups):
            d = gdt + g * desc_size
            (itable,) = struct.unpack_from("<I", m, d + 0x8)
            (flags,) = struct.unpack_from("<H", m, d + 0x12)
            if desc_size >= 64:
                itable |= struct.unpack_from("<I", m, d + 0x28)[0] << 32
            if flags & BG_INODE_UNINIT:
                continue
            base = itable * bs
            for i in range(inodes_per_group):
                ino = base + i * inode_size
                mode, links = struct.unpack_from("<H", m, ino)[0], struct.unpack_from("<H", m, ino + 0x1A)[0]
                if mode == 0 and links == 0:
                    continue
                struct.pack_into("<I", m, ino + 0x08, epoch)  # i_atime
                struct.pack_into("<I", m, ino + 0x0C, epoch)  # i_ctime
                if inode_size > 128:
                    (extra,) = struct.unpack_from("<H", m, ino + 0x80)
                    if extra >= 0x08:  # i_ctime_extra
                        struct.pack_into("<I", m, ino + 0x84, 0)
                    if extra >= 0x10:  # i_atime_extra
                        struct.pack_into("<I", m, ino + 0x8C, 0)
                    if extra >= 0x18:  # i_crtime, i_crtime_extra
                        struct.pack_into("<II", m, ino + 0x90, epoch, 0)
                touched += 1
        m.flush()
    return touched
