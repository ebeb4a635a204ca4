"""PID 1 of the agent guest, up to the agent: ``/opt/pyvm/bin/pyvm-init`` runs it (byte-compiled, as
``/opt/pyvm/lib/pyvm_init.py``).

Runs *inside the guest only* (the host never imports it); stdlib only. It mounts the API
filesystems, loads the kernel modules the agent needs before it can answer (``/etc/pyvm/
modules-early.list``: virtio_console; with ``finit_module``: no fork per module), forks one
process at idle priority (SCHED_IDLE) that loads the rest of ``/etc/pyvm/modules.list`` (virtiofs,
virtio_mem, virtio_net...) while the agent starts -- the agent loads whatever is still missing
before it mounts the share or onlines memory --, prints ``PYVM-AGENT-ENTRY <uptime> (...)`` on the
console and runs ``shim.guestagent.__main__``.main() in this same process, so the agent is PID 1.
When the image holds no ``shim/guestagent/__main__.py`` it prints ``PYVM-AGENT-MISSING`` and idles
(a test can still time the boot). Kernel command line ``pyvm.init=poweroff`` powers off right after
the marker (benchmarks).
"""

import ctypes
import os
import sys

LIB = "/opt/pyvm/lib"
MODULES_LIST = "/etc/pyvm/modules.list"
EARLY_MODULES_LIST = "/etc/pyvm/modules-early.list"
_libc = ctypes.CDLL(None, use_errno=True)
# os.uname, not platform.machine: importing platform costs ~0.15 s of a TCG boot (measured)
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}.get(os.uname().machine)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RELATIME = 2, 4, 8, 1 << 21
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def console(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def uptime() -> str:
    try:
        with open("/proc/uptime") as f:
            return f.read().split()[0]
    except OSError:  # /proc not mounted yet (the initramfs layout)
        return "?"


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target) and target != "/":
        return
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        console(f"pyvm-init: mount {fstype} on {target}: {os.strerror(err)}")


def read_list(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return None


def load_modules(kver: str, paths: list[str]) -> None:
    for rel in paths:
        name = os.path.basename(rel).split(".ko")[0].replace("-", "_")
        if os.path.isdir(f"/sys/module/{name}"):
            continue
        fd = os.open(f"/lib/modules/{kver}/{rel}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.syscall(_SYS_FINIT_MODULE, fd, b"", 0) != 0:
                err = ctypes.get_errno()
                if err != 17:  # EEXIST: already loaded (e.g. by the initramfs, or the agent)
                    console(f"pyvm-init: finit_module {rel}: {os.strerror(err)}")
        finally:
            os.close(fd)


def load_rest_in_background(kver: str, paths: list[str]) -> None:
    """Load ``paths`` in a child at SCHED_IDLE: it runs only while the agent waits (disk reads, the
    host), so the agent answers Health without waiting for virtiofs, virtio_mem or virtio_net. The
    agent, PID 1 and a subreaper, reaps the child; its pid is in ``PYVM_MODULES_LOADER_PID`` so that
    PrepareTemplate can wait for it."""
    pid = os.fork()
    if pid != 0:
        os.environ["PYVM_MODULES_LOADER_PID"] = str(pid)
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        load_modules(kver, paths)
        console(f"PYVM-MODULES-LOADED {uptime()}")
    finally:
        os._exit(0)


def setup() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    kver = os.uname().release
    every = read_list(MODULES_LIST) or []
    early = read_list(EARLY_MODULES_LIST)
    if early is None:  # an image without the split: everything before the agent
        load_modules(kver, every)
        return
    load_modules(kver, early)
    rest = [m for m in every if m not in early]
    if rest:
        load_rest_in_background(kver, rest)


def main() -> None:
    started = uptime()
    if os.getpid() == 1:
        setup()
    os.environ.update(
        PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        PYTHONPATH=LIB,
        PYTHONDONTWRITEBYTECODE="1",
        HOME="/root",
        LANG="C.UTF-8",
    )
    if LIB not in sys.path:
        sys.path.insert(0, LIB)
    sys.dont_write_bytecode = True
    console(f"PYVM-AGENT-ENTRY {uptime()} (pyvm-init started at {started})")
    with open("/proc/cmdline") as f:
        cmdline = f.read().split()
    if "pyvm.init=poweroff" in cmdline:
        os.sync()
        _libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
    if not os.path.exists(f"{LIB}/shim/guestagent/__main__.py"):
        console("PYVM-AGENT-MISSING shim/guestagent/__main__.py is not in this image")
        idle()
    import importlib

    # Nothing in the guest speaks TLS, but asyncio imports ssl (and OpenSSL) when it can: ~0.12 s of
    # a TCG boot (python3 -X importtime in the guest). asyncio treats a failed import as "no ssl".
    # Likewise shutil imports bz2 and lzma (two more shared libraries to load) for archive formats
    # the guest never packs; it treats a failed import as "format unsupported".
    for unused in ("ssl", "bz2", "lzma"):
        sys.modules.setdefault(unused, None)  # type: ignore[arg-type]
    sys.argv = ["shim.guestagent"]
    try:
        # the agent's main() directly, not runpy.run_module: runpy pulls in importlib.util, ~0.1 s
        # of a TCG boot (PYTHONPROFILEIMPORTTIME in the guest)
        importlib.import_module("shim.guestagent.__main__").main()
    finally:
        # PID 1 must not return (the kernel would panic): say so and power the VM off.
        console("PYVM-AGENT-EXITED")
        if os.getpid() == 1:
            os.sync()
            _libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)


def idle() -> None:
    import time

    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(3600)


if __name__ == "__main__":
    main()
