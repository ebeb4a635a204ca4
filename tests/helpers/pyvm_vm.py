"""Helpers for end-to-end tests that run pyvm VMs under a real containerd.

What they share: where the shim binary is, whether this host can boot a guest at all, a pyvm
configuration file for a test (memory sizes, hot-plug mechanism), and the leftover checks that
prove a sandbox was cleaned up: no QEMU/virtiofsd/shim process, no mount, no shim socket, no
sandbox directory.

Tests point the shim's runtime root at a temp dir (``PYVM_RUN_ROOT`` in containerd's environment,
inherited by the shims), so every QEMU and virtiofsd of a test mentions that dir on its command line
(``<run_root>/sbs/<sandbox-id>/...``) and can be found without guessing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shim import paths
from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir

if TYPE_CHECKING:
    from tests.helpers.cri import CriContainerd

VENV_BIN = Path(sys.executable).parent
SHIM_NAME = "containerd-shim-pyvm-v2"
SHIM = VENV_BIN / SHIM_NAME
RUNTIME = "io.containerd.pyvm.v2"
GUEST = paths.guest_dir("x86_64")
QEMU = Path("/usr/bin/qemu-system-x86_64")
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
SHIM_SOCKET_DIR = Path("/run/containerd/s")
#: containerd's environment for pyvm shims that fake only the VM (the explicit test seam, an in-memory
#: process that runs until killed); start/serve/ttrpc/events/delete are the real code.
FAKE_VM_ENV = {"PYVM_TEST_BACKEND": "shim.testing.fake_backend:FakeBackend", "PYVM_ENABLE_TEST_SEAMS": "1"}


def shim_skip_reason() -> str | None:
    """Why this host cannot run our shim under a private containerd (None if it can); no VM needed."""
    reason = Containerd.available()
    if reason:
        return reason
    if not SHIM.exists():
        return f"{SHIM} is not installed (run hack/setup.sh)"
    return None


def vm_skip_reason() -> str | None:
    """Why this host cannot boot a pyvm guest under containerd (None if it can)."""
    if os.geteuid() != 0:
        return "needs root"
    for f in (SHIM, QEMU, VIRTIOFSD, GUEST / "vmlinuz", GUEST / "initrd.img"):
        if not f.exists():
            return f"{f} is missing (run hack/setup.sh / pyvm guest build)"
    if shutil.which("containerd") is None:
        return "containerd is not installed"
    return None


def guest_kernel_release() -> str:
    """The kernel release of the installed guest image, from its manifest."""
    return str(json.loads((GUEST / "manifest.json").read_text())["kernel"]["release"])


@contextlib.contextmanager
def runc_and_pyvm_sleepers(prefix: str) -> Iterator[Containerd]:
    """A private containerd running ``sleep 600`` as ``runc1`` (the runc shim) and as ``pyvm1`` (our
    shim, VM faked by ``FAKE_VM_ENV``): the pair the shim benchmarks compare. Needs root. The
    containerd is stopped and the temp dirs (``/tmp/<prefix>run-*``, ``<prefix>img-*``) removed on exit."""
    run_root = short_base_dir(f"{prefix}run-")
    img = short_base_dir(f"{prefix}img-")
    try:
        with Containerd(extra_path=[VENV_BIN], env={"PYVM_RUN_ROOT": str(run_root), **FAKE_VM_ENV}) as c:
            c.import_image(build_busybox_image(img / "bb.tar"))
            c.ctr("run", "-d", BUSYBOX_REF, "runc1", "sleep", "600", check=True)
            c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_REF, "pyvm1", "sleep", "600", check=True)
            yield c
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
        shutil.rmtree(img, ignore_errors=True)


def write_config(path: Path, **hypervisor: object) -> Path:
    """A pyvm configuration file overriding ``[hypervisor]`` keys (the rest are the defaults)."""
    lines = ["[hypervisor]"]
    for k, v in hypervisor.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        else:
            lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll ``pred`` until it returns something truthy; returns it. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_task_running(c: Containerd, cid: str, run: subprocess.Popen[str], timeout: float) -> None:
    """Wait until ``ctr task ls`` shows task ``cid`` RUNNING, while ``run`` (its ``ctr run``) lives."""

    def running() -> bool:
        assert run.poll() is None, f"ctr run ended early ({run.returncode}): {run.communicate()}"
        ls = c.ctr("task", "ls").stdout
        return any(line.split()[:1] == [cid] and "RUNNING" in line for line in ls.splitlines())

    wait_for(running, timeout, f"task {cid} to run", interval=0.5)


def drain_pty(fd: int, pid: int, timeout: float) -> tuple[bytes, int]:
    """Read the pty master ``fd`` of the forked child ``pid`` until EOF (SIGKILL it after
    ``timeout`` s); close ``fd``, reap the child. Returns the output and the raw wait status."""
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child side closed
                    break
                if not chunk:
                    break
                out += chunk
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return out, status


# ctr (Linux) puts no consoleSize in the spec and sends ResizePty only after Start, so a process that
# asks at once may see 0x0 (busybox: "stty: standard input"), with runc too. What a test proves is
# that the resize reaches the guest's pty: this waits (10 s at most) for a non-zero size, prints it.
WAIT_TTY_SIZE = (
    "i=0; s=; while [ $i -lt 100 ]; do s=$(stty size 2>/dev/null); "
    'case "$s" in [1-9]*" "[1-9]*) break;; esac; i=$((i+1)); sleep 0.1; done; '
    'echo "size=$s tries=$i"'
)


def run_in_pty(argv: list[str], rows: int, cols: int, timeout: float) -> tuple[str, int]:
    """Run ``argv`` with a new pty of ``rows`` x ``cols`` as its controlling terminal; return its
    output and exit code. The size is set in the child before exec: set from the parent it raced
    with ctr reading its size (0x0) and with ctr's SIGWINCH handler not yet installed."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty's slave is our controlling terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.execv(argv[0], argv)
    out, status = drain_pty(fd, pid, timeout)
    return out.decode(errors="replace"), os.waitstatus_to_exitcode(status)


def cmdlines() -> list[tuple[int, list[str]]]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or not raw:
            continue
        out.append((int(entry), [a.decode(errors="replace") for a in raw.split(b"\0") if a]))
    return out


def pids_mentioning(needle: str, *, exe: str = "") -> list[int]:
    """Live processes whose argv mentions ``needle`` (and whose argv[0] ends with ``exe``)."""
    me = os.getpid()
    return sorted(
        pid
        for pid, argv in cmdlines()
        if pid != me and any(needle in a for a in argv) and (not exe or argv[0].endswith(exe))
    )


def qemu_pids(run_root: Path, sandbox_id: str = "") -> list[int]:
    needle = str(run_root / "sbs" / sandbox_id) if sandbox_id else str(run_root)
    return pids_mentioning(needle, exe=QEMU.name)


def virtiofsd_pids(run_root: Path, sandbox_id: str = "") -> list[int]:
    needle = str(run_root / "sbs" / sandbox_id) if sandbox_id else str(run_root)
    return pids_mentioning(needle, exe="virtiofsd")


def shim_pids(containerd_address: str) -> list[int]:
    """pyvm shim processes serving the containerd at ``containerd_address`` (the installed binary,
    or ``python -m shim.cli.shim_main`` as the daemon is re-executed when started that way)."""
    return sorted(
        pid
        for pid, argv in cmdlines()
        if any(SHIM_NAME in a or a == "shim.cli.shim_main" for a in argv[:3]) and containerd_address in argv
    )


def shim_socket(containerd_address: str, namespace: str, sandbox_id: str) -> Path:
    """The shim socket containerd 1.6/1.7 and our ``start`` derive for a sandbox."""
    joined = os.path.normpath(os.path.join(containerd_address, namespace, sandbox_id))
    return SHIM_SOCKET_DIR / hashlib.sha256(joined.encode()).hexdigest()


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path``, in mountinfo order."""
    prefix = str(path).rstrip("/")
    with open("/proc/self/mountinfo") as f:
        points = [unescape_mountinfo(line.split()[4]) for line in f]
    return [m for m in points if m == prefix or m.startswith(prefix + "/")]


def sandbox_leftovers(
    run_root: Path,
    sandbox_id: str,
    *,
    containerd_address: str,
    namespace: str,
    bundles: Iterable[Path] = (),
    check_shim: bool = True,
) -> list[str]:
    """What one sandbox left behind: processes, mounts, its socket, its directories."""
    found = [f"qemu pid {p}" for p in qemu_pids(run_root, sandbox_id)]
    found += [f"virtiofsd pid {p}" for p in virtiofsd_pids(run_root, sandbox_id)]
    if check_shim:
        sock = shim_socket(containerd_address, namespace, sandbox_id)
        found += [f"shim pid {p}" for p in pids_mentioning(sandbox_id, exe=SHIM_NAME)]
        if sock.exists():
            found.append(f"shim socket {sock}")
    sdir = run_root / "sbs" / sandbox_id
    found += [f"mount {m}" for m in mounts_under(sdir)]
    if sdir.exists():
        found.append(f"dir {sdir}: {sorted(p.name for p in sdir.iterdir())}")
    for b in bundles:
        found += [f"mount {m}" for m in mounts_under(b)]
        if b.exists():
            found.append(f"bundle {b}")
    return found


def wait_clean(timeout: float, **kwargs: object) -> None:
    """Wait until :func:`sandbox_leftovers` is empty; AssertionError naming what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = sandbox_leftovers(**kwargs)  # type: ignore[arg-type]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind after {timeout}s: {left}")
        time.sleep(0.3)


def force_clean(base: Path, run_root: Path) -> None:
    """Remove whatever a failed run left under ``base``: VM processes (QEMU, virtiofsd under
    ``run_root``), mounts (lazily, deepest first), then the files. Never removes through a mount."""
    for pid in qemu_pids(run_root) + virtiofsd_pids(run_root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for m in sorted(mounts_under(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)


def remove_leftovers(base: Path, run_root: Path) -> list[str]:
    """What a test's VMs left — QEMU and virtiofsd processes under ``run_root``, mounts under ``base`` —
    as ``["qemu <pid>", "virtiofsd <pid>", "mount <path>"]``, after removing all of it and ``base``
    (``force_clean``). A fixture asserts the list is empty once its containerd has stopped."""
    left = [f"qemu {p}" for p in qemu_pids(run_root)] + [f"virtiofsd {p}" for p in virtiofsd_pids(run_root)]
    left += [f"mount {m}" for m in mounts_under(base)]
    force_clean(base, run_root)
    return left


def cri_vm_dirs(prefix: str) -> tuple[Path, Path]:
    """Skip the calling test unless a CRI containerd and pyvm VMs can run here; else a fresh short
    base directory and its run root (``base / "r"``), for a configuration and :func:`pyvm_cri`."""
    import pytest

    from tests.helpers.cri import missing_prerequisites

    missing = missing_prerequisites()
    reason = vm_skip_reason()
    if missing or reason:
        pytest.skip(f"needs: {', '.join(missing) or reason}")
    base = short_base_dir(prefix)
    run_root = base / "r"
    run_root.mkdir()
    return base, run_root


def remove_pod_and_check_clean(h: CriContainerd, run_root: Path, pod: str) -> None:
    """StopPodSandbox + RemovePodSandbox as kubelet does; then nothing of the pod may be left (its
    shim cleans up after it answered, so this polls for up to 30 s)."""
    h.client.stop_pod_sandbox(pod)
    h.client.remove_pod_sandbox(pod)
    assert h.client.list_pod_sandbox() == []
    wait_pod_clean(h, run_root, pod)
    assert not list((run_root / "sbs").iterdir()) if (run_root / "sbs").exists() else True


def wait_pod_clean(h: CriContainerd, run_root: Path, pod: str, timeout: float = 30) -> None:
    """:func:`wait_clean` for a CRI pod of ``h`` whose VMs run under ``run_root``."""
    wait_clean(
        timeout,
        run_root=run_root,
        sandbox_id=pod,
        containerd_address=str(h.socket),
        namespace="k8s.io",
        bundles=[h.state / "io.containerd.runtime.v2.task" / "k8s.io" / pod],
    )


@contextlib.contextmanager
def pyvm_cri(base: Path, config: Path, run_root: Path) -> Iterator[CriContainerd]:
    """A started CRI containerd (``tests.helpers.cri``) whose ``pyvm`` runtime uses ``config`` and
    runs its VMs under ``run_root``; on exit it is stopped and nothing of it may be left."""
    from tests.helpers.cri import CriContainerd

    h = CriContainerd(
        base, pyvm_config_path=config, shim_dirs=[VENV_BIN], env={"PYVM_RUN_ROOT": str(run_root)}
    )
    try:
        h.start()
        yield h
    finally:
        h.stop()
        left = h.leftovers() + remove_leftovers(base, run_root)
        assert left == [], left


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def meminfo_kib(text: str, key: str = "MemTotal") -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"{key} not in meminfo: {text[:200]!r}")


__all__ = [
    "drain_pty",
    "wait_task_running",
    "FAKE_VM_ENV",
    "GUEST",
    "QEMU",
    "RUNTIME",
    "SHIM",
    "SHIM_NAME",
    "VENV_BIN",
    "force_clean",
    "guest_kernel_release",
    "host_boot_id",
    "meminfo_kib",
    "mounts_under",
    "pids_mentioning",
    "qemu_pids",
    "remove_leftovers",
    "runc_and_pyvm_sleepers",
    "sandbox_leftovers",
    "shim_pids",
    "shim_skip_reason",
    "shim_socket",
    "unescape_mountinfo",
    "virtiofsd_pids",
    "vm_skip_reason",
    "wait_clean",
    "wait_for",
    "write_config",
]
