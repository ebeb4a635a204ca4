"""Facts about the guest kernel and memory, and bringing hot-plugged memory online."""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from shim.guestagent.cgroups import CGROUP_ROOT, cgroup_version

MEMORY_SYSFS = Path("/sys/devices/system/memory")
#: written by the image builder: every module the guest loads, dependencies first
MODULES_LIST = Path("/etc/pyvm/modules.list")
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}
_EEXIST = 17
_BLOCK_RE = re.compile(r"^memory(\d+)$")


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes, keyed by field name (``MemTotal``, ...)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


@dataclass
class ModulesLoaded:
    """What ``load_listed_modules`` did: modules listed, loaded by this call, and the failures."""

    listed: int = 0
    loaded: int = 0
    failures: list[str] = field(default_factory=list)


def load_modules(list_path: Path = MODULES_LIST, sysmodule: Path = Path("/sys/module")) -> list[str]:
    """``load_listed_modules`` for callers that only care about the failures (``path: error``)."""
    return load_listed_modules(list_path, sysmodule).failures


def load_listed_modules(
    list_path: Path = MODULES_LIST, sysmodule: Path = Path("/sys/module")
) -> ModulesLoaded:
    """Load every module of ``list_path`` that is not live yet; failures are listed, never raised.

    pyvm-init loads only what the agent needs to answer (virtio_console) before it starts the agent,
    and the rest in a background process at idle priority; whatever needs the rest (the virtio-fs
    mount, memory hotplug, a template) calls this first. A module that is live (or built in) is
    skipped. One that the background process is loading right now (``initstate`` "coming") is
    loaded again: the kernel waits until that load finished, then says EEXIST, so on return every
    listed module is live or failed. No list (a test on a host): nothing to do. Blocking: run it
    in a thread.
    """
    result = ModulesLoaded()
    try:
        paths = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    except OSError:
        return result
    import ctypes

    result.listed = len(paths)
    uname = os.uname()
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    for rel in paths:
        name = rel.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")
        if _module_live(sysmodule / name):
            continue
        try:
            fd = os.open(f"/lib/modules/{uname.release}/{rel}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result.failures.append(f"{rel}: {exc.strerror}")
            continue
        try:
            if syscall(_SYS_FINIT_MODULE.get(uname.machine, -1), fd, b"", 0) == 0:
                result.loaded += 1
            else:
                err = ctypes.get_errno()
                if err != _EEXIST:
                    result.failures.append(f"{rel}: {os.strerror(err)}")
        finally:
            os.close(fd)
    return result


def _module_live(d: Path) -> bool:
    """``/sys/module/<name>`` exists and, for a loadable module, its ``initstate`` is "live" (a
    built-in module has no ``initstate``; one being loaded says "coming")."""
    try:
        return (d / "initstate").read_text().strip() == "live"
    except FileNotFoundError:
        return d.is_dir()
    except OSError:
        return False


def memory_block_size(sysfs: Path = MEMORY_SYSFS) -> int:
    try:
        return int((sysfs / "block_size_bytes").read_text().strip(), 16)
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class Details:
    memory_block_size: int
    kernel_release: str
    cgroup_version: int
    boot_id: str
    mem_total: int
    arch: str
    online_cpus: int
    memory_hotplug: bool


def details(sysfs: Path = MEMORY_SYSFS, cgroup_root: Path = CGROUP_ROOT) -> Details:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    uname = os.uname()  # not platform.uname(): the platform module is slow to import under TCG
    return Details(
        memory_block_size=memory_block_size(sysfs),
        kernel_release=uname.release,
        cgroup_version=cgroup_version(cgroup_root),
        boot_id=boot_id,
        mem_total=meminfo().get("MemTotal", 0),
        arch=uname.machine,
        online_cpus=len(os.sched_getaffinity(0)),
        memory_hotplug=sysfs.is_dir(),
    )


@dataclass
class OnlineResult:
    blocks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bytes_onlined: int = 0
    mem_total: int = 0


def online_once(movable: bool, result: OnlineResult, sysfs: Path = MEMORY_SYSFS) -> None:
    """Write ``online``/``online_movable`` into every offline block's ``state``."""
    block_size = memory_block_size(sysfs)
    target = "online_movable" if movable else "online"
    try:
        entries = sorted(
            (int(m.group(1)), e.name) for e in os.scandir(sysfs) if (m := _BLOCK_RE.match(e.name))
        )
    except OSError:
        return
    failed = {f.split(":", 1)[0] for f in result.failures}
    for _n, name in entries:
        state = sysfs / name / "state"
        try:
            if state.read_text().strip() != "offline" or name in failed:
                continue
            state.write_text(target)
        except OSError as exc:
            result.failures.append(f"{name}: {exc.strerror or exc}")
            continue
        result.blocks.append(name)
        result.bytes_onlined += block_size


async def online_memory(
    movable: bool, wait_for_bytes: int = 0, wait_ms: int = 0, sysfs: Path = MEMORY_SYSFS
) -> OnlineResult:
    """Online every offline memory block; keep polling (20 ms) for newly appearing ones until
    ``wait_for_bytes`` came online or ``wait_ms`` passed. Never raises for a refused block: it is
    listed in ``failures``.
    """
    result = OnlineResult()
    deadline = time.monotonic() + wait_ms / 1000
    while True:
        await asyncio.to_thread(online_once, movable, result, sysfs)
        if result.bytes_onlined >= wait_for_bytes or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    result.mem_total = meminfo().get("MemTotal", 0)
    return result


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: name[16] + short flags, padded to 40 bytes


def loopback_up(name: str = "lo") -> bool:
    """Bring the guest's loopback interface up; returns whether it was down.

    Pod containers share the VM's network namespace (the host-side netns from CNI means nothing in
    the guest), and many programs need 127.0.0.1. A new kernel leaves ``lo`` down until init raises it.
    """
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack(_IFREQ, name.encode(), 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        if flags & _IFF_UP:
            return False
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | _IFF_UP))
        return True
