"""What the agent changes in the guest kernel for the host: the wall clock, the RNG, the page cache.

A VM restored from a template wakes up with the wall clock and the CRNG state of the moment the
template was saved, identical in every VM restored from it; CreateSandbox fixes both. These calls
change the whole kernel, so the agent makes them only when it owns the kernel (it is PID 1 of a
guest, ``Config.guest_kernel``), never in a test on a host. Blocking: run them in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

#: linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07) (checked against the uapi header)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
#: the most entropy one CreateSandbox may carry
MAX_ENTROPY = 512
RANDOM_DEVICE = "/dev/urandom"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

Ioctl = Callable[..., object]


def rand_pool_info(data: bytes) -> bytes:
    """``struct rand_pool_info {int entropy_count; int buf_size; __u32 buf[];}`` crediting every
    bit of ``data`` (``entropy_count`` is in bits, ``buf_size`` in bytes)."""
    return struct.pack("=ii", len(data) * 8, len(data)) + data


def add_entropy(data: bytes, *, device: str = RANDOM_DEVICE, ioctl: Ioctl = fcntl.ioctl) -> bool:
    """Mix ``data`` into the input pool, credited as full entropy, then force a CRNG reseed so
    that what the kernel hands out from now on depends on it.

    Returns False when the kernel refused the reseed because its CRNG is not initialized yet
    (ENODATA): it then seeds from the pool that already holds ``data``. Raises ``OSError`` (EPERM
    without CAP_SYS_ADMIN) and ``ValueError`` for more than ``MAX_ENTROPY`` bytes.
    """
    if len(data) > MAX_ENTROPY:
        raise ValueError(f"{len(data)} bytes of entropy; at most {MAX_ENTROPY}")
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        ioctl(fd, RNDADDENTROPY, rand_pool_info(data))
        try:
            ioctl(fd, RNDRESEEDCRNG, 0)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            return False
    finally:
        os.close(fd)
    return True


def set_realtime(ns: int, *, settime: Callable[[int, int], object] = time.clock_settime_ns) -> float:
    """Set CLOCK_REALTIME to ``ns`` since the epoch; return how far it jumped, in seconds.
    Raises ``OSError`` (EPERM without CAP_SYS_TIME, EINVAL for a time the kernel refuses)."""
    jump = (ns - time.time_ns()) / 1e9
    settime(time.CLOCK_REALTIME, ns)
    return jump


def drop_caches(path: Path = DROP_CACHES) -> None:
    """Write back dirty data, then drop the page cache, dentries and inodes (``3``)."""
    os.sync()
    path.write_text("3\n")
