"""Offline cleanup of a sandbox directory: kill what it recorded, unmount, remove. Idempotent.

Used by ``delete`` (when the daemon is gone) and by the daemon itself on its way out. Nothing here
talks to a live shim, VM or agent; it only undoes on-disk and process state it can prove is ours:
a pid is killed only if its command line names this sandbox's directory (pid reuse is harmless).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
from pathlib import Path

from shim.paths import SandboxDir
from shim.resources import storage
from shim.resources.storage import unmount_order

_MNT_DETACH = 2


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` in the order to unmount them: deepest first, and of mounts
    stacked on one point the topmost first (each occurrence is listed)."""
    try:
        return [Path(e.mount_point) for e in unmount_order(storage.mounts_under(path))]
    except OSError:
        return []


def unmount_under(path: Path) -> list[str]:
    """Lazily unmount everything at or below ``path``. Returns the errors (best effort)."""
    points = mounts_under(path)
    if not points:
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    errors: list[str] = []
    for mp in points:
        if libc.umount2(os.fsencode(mp), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            errors.append(f"umount {mp}: {os.strerror(err)}")
    return errors


def _pid_names(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def kill_recorded_processes(sdir: SandboxDir) -> list[int]:
    """SIGKILL the helpers whose pid files are in ``sdir`` (QEMU, virtiofsd) if their command line
    names ``sdir.root``. Returns the pids killed."""
    killed: list[int] = []
    for pid_file in (sdir.qemu_pid, sdir.virtiofsd_pid):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid > 0 and _pid_names(pid, str(sdir.root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def remove_container(sdir: SandboxDir, container_id: str) -> list[str]:
    """Unmount and remove ``container_id``'s part of the sandbox share. Returns errors."""
    target = sdir.container_share(container_id)
    errors = unmount_under(target)
    if mounts_under(target):
        return [*errors, f"{target} not removed: still mounted"]
    shutil.rmtree(target, ignore_errors=True)
    if target.exists():
        errors.append(f"{target} could not be removed")
    return errors


def remove_sandbox(sdir: SandboxDir) -> list[str]:
    """Kill the sandbox's recorded helpers, unmount everything below it, remove its directory.

    Returns warnings (what had to be killed, what could not be undone); never raises for cleanup
    failures. Logging is the caller's job (``delete`` must keep stdout clean)."""
    killed = kill_recorded_processes(sdir)
    errors = [f"killed leftover process {pid}" for pid in killed]
    errors += unmount_under(sdir.root)
    # virtiofsd 7.2 locks its socket with a pid file outside the sandbox dir and never removes it
    with contextlib.suppress(OSError):
        os.unlink("/run/virtiofsd/" + str(sdir.virtiofsd_sock).replace("/", ".") + ".pid")
    left = mounts_under(sdir.root)
    if left:
        # never rm -rf through a mount: it would delete the container's or a volume's host data
        return [*errors, f"{sdir.root} not removed: still mounted {[str(p) for p in left]}"]
    shutil.rmtree(sdir.root, ignore_errors=True)
    if sdir.root.exists():
        errors.append(f"{sdir.root} could not be removed")
    return errors


__all__ = ["kill_recorded_processes", "mounts_under", "remove_container", "remove_sandbox", "unmount_under"]
