"""A private containerd (1.6, ``/usr/bin/containerd``) for end-to-end tests, and a registry-free
busybox OCI image to run in it.

Everything lives under one base directory: ``root/``, ``state/``, the gRPC socket
``containerd.sock``, the ttrpc socket ``containerd.sock.ttrpc``, ``config.toml`` and the debug log
``containerd.log``. Nothing is shared with a system containerd except ``/run/containerd/s`` (shim
sockets, named by a hash that includes our socket address) and ``/run/containerd/fifo`` (ctr's
stdio FIFOs, uniquely named).

Typical use (needs root; ``Containerd.available()`` says whether this host can run it)::

    @pytest.fixture
    def containerd(tmp_path):
        with Containerd(tmp_path / "ctrd") as c:   # starts, waits for readiness
            c.import_image(build_busybox_image(tmp_path / "bb.tar"))
            yield c                                # stop() on exit, even on failure

    def test_x(containerd):
        containerd.ctr("run", "-d", BUSYBOX_REF, "c1", "sleep", "60", check=True)

``stop()`` leaves nothing behind: it kills and deletes every task, stops containerd, kills any shim
still serving this instance (and the shims' children), and unmounts whatever is left mounted
under the base directory. Keep unix socket paths short (< 108 bytes): use a short base directory
(``short_base_dir()``) if the test's tmp path is long.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
BUSYBOX = "/bin/busybox"
BUSYBOX_REF = "docker.io/library/pybb:latest"
DEFAULT_NAMESPACE = "default"

#: CRI settings these hosts need (no CAP_SYS_RESOURCE), used when ``cri=True`` and no fragment given.
DEFAULT_CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
"""


class ContainerdError(RuntimeError):
    """containerd did not start, stop or answer as expected; the message carries the log tail."""


def short_base_dir(prefix: str = "ctrd-") -> Path:
    """A fresh directory under /tmp short enough for unix socket paths; the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Containerd:
    """One private containerd daemon. Not thread-safe; one test (or fixture) owns it.

    Args:
        base_dir: where everything lives; created if missing. Removed by ``stop()`` only if
            ``remove_base_dir`` (default: only when this object created it via ``base_dir=None``).
        cri: enable the CRI plugin (disabled by default); ``cri_config`` is the TOML fragment for
            it (default ``DEFAULT_CRI_CONFIG``). Its own root/state live under ``root``/``state``.
        extra_config: TOML appended verbatim to ``config.toml`` (e.g. runtime registrations).
        extra_path: directories put in front of containerd's PATH (where it looks up shims
            ``containerd-shim-<name>-<version>``).
        env: extra environment for containerd (and, through it, the shims).
        command_prefix: argv prepended to the containerd command, e.g.
            ``["unshare", "--net", "--"]`` to run it in its own network namespace.
        start_timeout: seconds to wait for readiness.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        cri: bool = False,
        cri_config: str | None = None,
        extra_config: str = "",
        extra_path: Sequence[str | os.PathLike[str]] = (),
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
        start_timeout: float = 60.0,
        remove_base_dir: bool | None = None,
        binary: str = CONTAINERD,
        ctr_binary: str = CTR,
    ) -> None:
        created = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else short_base_dir()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.remove_base_dir = created if remove_base_dir is None else remove_base_dir
        self.root = self.base_dir / "root"
        self.state = self.base_dir / "state"
        self.address = str(self.base_dir / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        if len(self.ttrpc_address) >= 100:
            raise ContainerdError(
                f"base dir {self.base_dir} is too long for unix sockets; use short_base_dir()"
            )
        self.cri = cri
        self.cri_config = DEFAULT_CRI_CONFIG if cri_config is None else cri_config
        self.extra_config = extra_config
        self.extra_path = [str(p) for p in extra_path]
        self.env = dict(env or {})
        self.command_prefix = list(command_prefix)
        self.start_timeout = start_timeout
        self.binary = binary
        self.ctr_binary = ctr_binary
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- availability --------------------------------------------------------------------------

    @staticmethod
    def available() -> str | None:
        """``None`` if a private containerd can run here, else the reason it cannot."""
        if os.geteuid() != 0:
            return "needs root"
        for b in (CONTAINERD, CTR):
            if not os.access(b, os.X_OK):
                return f"{b} is not installed"
        return None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_config(self) -> None:
        """(Re)write ``config.toml`` from the constructor's settings."""
        disabled = [] if self.cri else ['"io.containerd.grpc.v1.cri"']
        text = f"""# written by tests/helpers/containerd.py
version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [{", ".join(disabled)}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.ttrpc_address}"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.base_dir / "opt"}"
"""
        if self.cri:
            text += "\n" + self.cri_config.strip() + "\n"
        if self.extra_config:
            text += "\n" + self.extra_config.strip() + "\n"
        self.config_path.write_text(text)

    def start(self) -> None:
        """Write the config, start containerd, wait until it answers ``ctr version`` and the ttrpc
        socket exists. Raises ``ContainerdError`` (with the log tail) if it dies or times out."""
        if self.running:
            raise ContainerdError("containerd is already running")
        self.write_config()
        env = dict(os.environ)
        env.update(self.env)
        env["PATH"] = os.pathsep.join([*self.extra_path, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        self._log_file = open(self.log_path, "ab")  # closed in _stop_daemon
        self.proc = subprocess.Popen(
            [*self.command_prefix, self.binary, "--config", str(self.config_path), "--log-level", "debug"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ContainerdError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.address) and os.path.exists(self.ttrpc_address):
                r = self.ctr("version", timeout=10)
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd not ready after {self.start_timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc else None

    def restart(self) -> None:
        """Stop the daemon (shims and containers keep running, as in a real upgrade) and start it
        again; containerd then reconnects to the shims from their bundles' ``address`` files."""
        self._stop_daemon()
        self.start()

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start. Never raises for
        cleanup failures that leave nothing running (it does its best and moves on)."""
        if self.running:
            with contextlib.suppress(Exception):
                self.remove_all()
        sockets = self._shim_sockets()
        self._stop_daemon()
        self.kill_shims()
        for sock in sockets:
            with contextlib.suppress(OSError):
                os.unlink(sock)
        self.unmount_all()
        if self.remove_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _stop_daemon(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- cleanup -------------------------------------------------------------------------------

    def remove_all(self, timeout: float = 20.0) -> None:
        """SIGKILL and delete every task, then delete every container, in every namespace."""
        for ns in self.namespaces():
            for task in self._lines("-n", ns, "tasks", "ls", "-q"):
                self.ctr("-n", ns, "tasks", "kill", "-a", "-s", "SIGKILL", task, timeout=timeout)
            deadline = time.monotonic() + timeout
            for task in self._lines("-n", ns, "tasks", "ls", "-q"):
                while time.monotonic() < deadline:
                    r = self.ctr("-n", ns, "tasks", "delete", "-f", task, timeout=timeout)
                    if r.returncode == 0 or "not found" in r.stderr:
                        break
                    time.sleep(0.2)
            for c in self._lines("-n", ns, "containers", "ls", "-q"):
                self.ctr("-n", ns, "containers", "delete", c, timeout=timeout)

    def _shim_sockets(self) -> list[str]:
        """Shim sockets named in bundles' ``address`` files (they live in /run/containerd/s)."""
        out = []
        for addr in self.state.glob("io.containerd.runtime.v2.task/*/*/address"):
            with contextlib.suppress(OSError):
                out.append(addr.read_text().strip().removeprefix("unix://"))
        return out

    def namespaces(self) -> list[str]:
        return self._lines("namespaces", "ls", "-q")

    def shim_pids(self) -> list[int]:
        """Processes started as shims of this containerd (their argv has ``-address <our socket>``)."""
        pids = []
        for pid, argv in _processes():
            if "-address" in argv and self.address in argv and pid != os.getpid():
                i = argv.index("-address")
                if i + 1 < len(argv) and argv[i + 1] == self.address:
                    pids.append(pid)
        return pids

    def kill_shims(self) -> None:
        """SIGKILL every shim of this instance and all their descendants (container processes)."""
        shims = self.shim_pids()
        if not shims:
            return
        victims = _descendants(shims)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in victims):
            time.sleep(0.05)

    def unmount_all(self) -> None:
        """Lazily unmount every mount point under the base directory, deepest first."""
        base = str(self.base_dir.resolve())
        mounts = []
        with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
            for line in f:
                target = line.split()[4].encode().decode("unicode_escape")
                if target == base or target.startswith(base + "/"):
                    mounts.append(target)
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)

    # -- ctr -----------------------------------------------------------------------------------

    def ctr(
        self,
        *args: str | os.PathLike[str],
        check: bool = False,
        timeout: float | None = 120,
        input: bytes | str | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <our socket> [-n namespace] ARGS``; text output captured.

        Raises ``subprocess.CalledProcessError`` (with stdout/stderr) if ``check`` and it fails,
        ``subprocess.TimeoutExpired`` on timeout.
        """
        argv = [self.ctr_binary, "--address", self.address]
        if namespace is not None:
            argv += ["--namespace", namespace]
        argv += [os.fspath(a) for a in args]
        text_input = input.decode() if isinstance(input, bytes) else input
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=text_input,
            stdin=None if text_input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def ctr_popen(self, *args: str | os.PathLike[str], **kw: Any) -> subprocess.Popen[str]:
        """Start a long-running ``ctr`` (e.g. ``events``); the caller must terminate it."""
        argv = [self.ctr_binary, "--address", self.address, *(os.fspath(a) for a in args)]
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(argv, text=True, **kw)

    def import_image(self, tar: str | os.PathLike[str], namespace: str = DEFAULT_NAMESPACE) -> str:
        """``ctr images import`` an OCI/docker archive; returns ctr's output."""
        r = self.ctr("-n", namespace, "images", "import", "--all-platforms", tar, check=True, timeout=300)
        return r.stdout

    def bundle_dir(self, container_id: str, namespace: str = DEFAULT_NAMESPACE) -> Path:
        """The runtime-v2 bundle of a task (holds ``address``, ``config.json``, ``rootfs``)."""
        return self.state / "io.containerd.runtime.v2.task" / namespace / container_id

    def shim_address(self, container_id: str, namespace: str = DEFAULT_NAMESPACE) -> str:
        """The shim socket path from the bundle's ``address`` file (``unix://`` stripped)."""
        addr = (self.bundle_dir(container_id, namespace) / "address").read_text().strip()
        return addr.removeprefix("unix://")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _lines(self, *args: str) -> list[str]:
        r = self.ctr(*args, timeout=30)
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []


# -- processes -------------------------------------------------------------------------------------


def _processes() -> Iterable[tuple[int, list[str]]]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        yield int(entry), [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(roots: Iterable[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- a registry-free busybox OCI image -------------------------------------------------------------


def build_busybox_image(
    tar_path: str | os.PathLike[str],
    ref: str = BUSYBOX_REF,
    *,
    busybox: str = BUSYBOX,
    cmd: Sequence[str] = ("/bin/sh",),
    arch: str | None = None,
) -> Path:
    """Write an OCI image tar holding one image ``ref`` built from a static ``busybox``; returns its path.

    No registry or network. The one implementation is ``hack/mkimage.py`` (also used by the CRI
    harness and the quickstart); this keeps the older call signature.
    """
    from tests.helpers.cri import load_mkimage

    return (
        load_mkimage()
        .build_image(Path(tar_path), ref, cmd=cmd, busybox=Path(busybox), architecture=arch)
        .path
    )


__all__ = [
    "BUSYBOX_REF",
    "DEFAULT_CRI_CONFIG",
    "DEFAULT_NAMESPACE",
    "Containerd",
    "ContainerdError",
    "build_busybox_image",
    "short_base_dir",
]
