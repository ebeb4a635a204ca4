"""The task vocabulary below the API edge: what the service asks a backend, and what comes back.

Frozen dataclasses only; ``shim/api/translate.py`` builds them from protobuf and back. Times are
``datetime`` in UTC; a process that has not exited has ``exited_at = None`` (never the epoch).
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: Exit status when the real one cannot be known (containerd's convention).
UNKNOWN_EXIT_STATUS = 255


@dataclass(frozen=True)
class Mount:
    """One rootfs mount as containerd passes it (``type``, ``source``, ``target``, ``options``)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stdio:
    """Where a process's streams go: FIFO paths, ``file://`` or ``binary://`` URIs, or "" (none)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @property
    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


@dataclass(frozen=True)
class ContainerRequest:
    """Create a container (its init process is created, not started).

    ``options`` is the runtime options' config path if containerd sent ``runtimeoptions.v1.Options``.
    """

    id: str
    bundle: str
    rootfs: tuple[Mount, ...] = ()
    stdio: Stdio = Stdio()
    checkpoint: str = ""
    config_path: str = ""


@dataclass(frozen=True)
class ExecRequest:
    """Add an exec process; ``process`` is the OCI runtime-spec Process (decoded JSON)."""

    container_id: str
    exec_id: str
    stdio: Stdio
    process: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended. ``status``: exit code, or 128+signal if killed by a signal."""

    status: int
    exited_at: datetime

    @classmethod
    def now(cls, status: int) -> ExitStatus:
        return cls(status, datetime.now(UTC))

    @classmethod
    def killed_by(cls, sig: int) -> ExitStatus:
        return cls.now(128 + int(sig))


@dataclass(frozen=True)
class ProcessStatus:
    """What ``State`` reports for one process."""

    container_id: str
    exec_id: str  # "" for the init process
    bundle: str
    pid: int
    status: str  # "created" | "running" | "paused" | "stopped" (containerd's Status names)
    stdio: Stdio
    exit_status: int = 0
    exited_at: datetime | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """One entry of ``Pids``: a host-visible pid and, for execs, the exec id."""

    pid: int
    exec_id: str = ""


@dataclass(frozen=True)
class Resources:
    """A container resources update: the OCI ``LinuxResources`` object (decoded JSON) + annotations."""

    linux: Mapping[str, Any] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerStats:
    """The numbers CRI and ``ctr task metrics`` use; the API edge encodes them as cgroups Metrics.

    Byte counts in bytes, CPU times in nanoseconds; 0 means "not known".
    """

    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    memory_usage: int = 0
    memory_limit: int = 0
    memory_inactive_file: int = 0
    memory_anon: int = 0
    memory_file: int = 0
    pgfault: int = 0
    pgmajfault: int = 0
    pids_current: int = 0
    pids_limit: int = 0
    oom_kills: int = 0


#: Signals whose default action does not end a process: killing a never-started process with one of
#: them changes nothing (the others stop it, as they would kill runc's waiting init).
NON_TERMINATING_SIGNALS = frozenset(
    {0, int(_signal.SIGCHLD), int(_signal.SIGCONT), int(_signal.SIGURG), int(_signal.SIGWINCH)}
)


__all__ = [
    "NON_TERMINATING_SIGNALS",
    "UNKNOWN_EXIT_STATUS",
    "ContainerRequest",
    "ContainerStats",
    "ExecRequest",
    "ExitStatus",
    "Mount",
    "ProcessInfo",
    "ProcessStatus",
    "Resources",
    "Stdio",
]
