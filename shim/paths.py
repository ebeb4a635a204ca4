"""Every on-disk location pyvm uses, in one place (one owner per fact).

Per-sandbox runtime files live under ``/run/pyvm/sbs/<sandbox-id>/`` (tmpfs: gone after a reboot,
as a VM would be). The root can be moved with ``PYVM_RUN_ROOT`` (tests use a temp dir). A failed
sandbox's logs are kept in ``<run root>/postmortem/<sandbox-id>/`` (the newest ``POSTMORTEM_KEEP``).

Sandbox directories are keyed by sandbox id only, as Kata's ``/run/vc/sbs/<id>``: the same id in two
containerd namespaces is refused (``shim.sandbox.persist.claim``), not given two directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition
from shim.ids import validate_id

#: where `pyvm guest build` installs guest images: <root>/<arch>/<hash>/ and <root>/<arch>/current
GUEST_ROOT = Path(os.environ.get("PYVM_GUEST_ROOT", "/var/lib/pyvm/guest"))
#: where `pyvm template build` saves VM templates (the default of ``[factory] template_path``)
TEMPLATE_ROOT = Path(os.environ.get("PYVM_TEMPLATE_ROOT", "/var/lib/pyvm/templates"))
#: default configuration file (overridden by PYVM_CONFIG and by containerd's ConfigPath option)
DEFAULT_CONFIG = Path("/etc/pyvm/configuration.toml")
#: host-wide caches (accelerator verdict, ...)
CACHE_ROOT = Path(os.environ.get("PYVM_CACHE_ROOT", "/var/cache/pyvm"))
#: containerd's hard-coded shim socket directory (1.6/1.7); ``shim_socket_dir()`` is the one in use
SHIM_SOCKET_DIR = Path("/run/containerd/s")
#: moves the shim sockets (tests, benchmarks); read when asked, not at import
SHIM_SOCKET_DIR_ENV = "PYVM_SHIM_SOCKET_DIR"
#: longest unix socket path the kernel accepts: ``sun_path`` is 108 bytes with the terminating NUL
UNIX_PATH_MAX = 107
#: how many failed sandboxes' post-mortem log directories are kept (the oldest go first)
POSTMORTEM_KEEP = 20

#: virtio-serial port name of the guest agent and the virtio-fs tag of the sandbox share
AGENT_PORT_NAME = "io.pyvm.agent.0"
LOG_PORT_NAME = "io.pyvm.log.0"
SHARE_TAG = "pyvm-shared"
#: where the guest mounts the sandbox share
GUEST_SHARE_DIR = "/run/pyvm/shared"


def run_root() -> Path:
    return Path(os.environ.get("PYVM_RUN_ROOT", "/run/pyvm"))


def shim_socket_dir() -> Path:
    """Where the shim sockets go: ``$PYVM_SHIM_SOCKET_DIR`` if set, else containerd's
    ``SHIM_SOCKET_DIR`` (containerd 1.6/1.7 derive the same path; only tests move it)."""
    override = os.environ.get(SHIM_SOCKET_DIR_ENV)
    return Path(override) if override else SHIM_SOCKET_DIR


def guest_dir(arch: str) -> Path:
    """The installed guest image for ``arch`` (``x86_64`` or ``aarch64``)."""
    return GUEST_ROOT / arch / "current"


@dataclass(frozen=True)
class SandboxDir:
    """The runtime directory of one sandbox (one VM) and every file in it."""

    sandbox_id: str
    root: Path

    @classmethod
    def for_sandbox(cls, sandbox_id: str, base: Path | None = None) -> SandboxDir:
        validate_id(sandbox_id, kind="sandbox id")
        return cls(sandbox_id, (base or run_root() / "sbs") / sandbox_id)

    @property
    def state_json(self) -> Path:
        return self.root / "state.json"

    @property
    def qmp_sock(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def agent_sock(self) -> Path:
        return self.root / "agent.sock"

    @property
    def guest_log_sock(self) -> Path:
        return self.root / "guest-log.sock"

    @property
    def virtiofsd_sock(self) -> Path:
        return self.root / "virtiofsd.sock"

    @property
    def metrics_sock(self) -> Path:
        return self.root / "metrics.sock"

    @property
    def console_sock(self) -> Path:
        """The serial console as a socket (only when a console socket is asked for)."""
        return self.root / "console.sock"

    @property
    def sockets(self) -> tuple[Path, ...]:
        """Every unix socket this sandbox binds or connects to."""
        return (
            self.qmp_sock,
            self.agent_sock,
            self.guest_log_sock,
            self.virtiofsd_sock,
            self.metrics_sock,
            self.console_sock,
        )

    def check_socket_paths(self) -> None:
        """Refuse a run root so long that a socket path of this sandbox does not fit ``sun_path``
        (QEMU and virtiofsd would die later with "Socket path too long", far from the cause).

        :raises FailedPrecondition: naming the longest path, its length and the limit.
        """
        longest = max(self.sockets, key=lambda p: len(os.fsencode(p)))
        n = len(os.fsencode(longest))
        if n > UNIX_PATH_MAX:
            raise FailedPrecondition(
                f"unix socket path {longest} is {n} bytes, longer than the kernel's limit of "
                f"{UNIX_PATH_MAX}; use a shorter run root (PYVM_RUN_ROOT, now {self.root.parent.parent})",
                path=str(longest),
                length=n,
                limit=UNIX_PATH_MAX,
            )

    @property
    def postmortem(self) -> Path:
        """Where this sandbox's logs are kept after a failure: ``<run root>/postmortem/<id>/``, a
        sibling of ``sbs/`` (which the sandbox cleanup removes and ``pyvm monitor`` scans)."""
        return self.postmortem_root / self.sandbox_id

    @property
    def postmortem_root(self) -> Path:
        return self.root.parent.parent / "postmortem"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def virtiofsd_log(self) -> Path:
        return self.root / "virtiofsd.log"

    @property
    def guest_log(self) -> Path:
        return self.root / "guest.log"

    @property
    def qemu_pid(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def virtiofsd_pid(self) -> Path:
        return self.root / "virtiofsd.pid"

    @property
    def efivars(self) -> Path:
        """The per-VM writable copy of the UEFI variable store."""
        return self.root / "efivars.fd"

    @property
    def share(self) -> Path:
        """Host side of the virtio-fs share; the guest sees it at GUEST_SHARE_DIR."""
        return self.root / "shared"

    def container_share(self, container_id: str) -> Path:
        validate_id(container_id, kind="container id")
        return self.share / container_id

    def guest_container_dir(self, container_id: str) -> str:
        validate_id(container_id, kind="container id")
        return f"{GUEST_SHARE_DIR}/{container_id}"


__all__ = [
    "AGENT_PORT_NAME",
    "CACHE_ROOT",
    "DEFAULT_CONFIG",
    "GUEST_ROOT",
    "GUEST_SHARE_DIR",
    "LOG_PORT_NAME",
    "SHARE_TAG",
    "TEMPLATE_ROOT",
    "POSTMORTEM_KEEP",
    "SHIM_SOCKET_DIR",
    "SHIM_SOCKET_DIR_ENV",
    "UNIX_PATH_MAX",
    "SandboxDir",
    "guest_dir",
    "run_root",
    "shim_socket_dir",
]
