"""What the agent client returns: small frozen dataclasses, never protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Stdio:
    """Which streams the host will use; an unused one is /dev/null in the container."""

    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class GuestInterface:
    """A network interface the guest configures on the NIC with ``mac`` (CreateSandbox)."""

    name: str
    mac: str
    mtu: int = 0
    #: "10.88.0.5/16", "fd00::5/64"
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestRoute:
    """A route of the guest's main table; ``destination`` "" is the default route of ``family``."""

    destination: str
    gateway: str = ""
    device: str = ""
    source: str = ""
    #: RT_SCOPE_*: 0 universe, 253 link
    scope: int = 0
    #: 2 (AF_INET) or 10 (AF_INET6)
    family: int = 2


@dataclass(frozen=True)
class AgentVersion:
    agent_version: str
    protocol_version: int
    python_version: str
    crun_version: str


@dataclass(frozen=True)
class GuestDetails:
    memory_block_size: int
    kernel_release: str
    cgroup_version: int
    boot_id: str
    mem_total: int
    arch: str
    online_cpus: int
    memory_hotplug: bool


@dataclass(frozen=True)
class MemInfo:
    mem_total: int
    mem_free: int
    mem_available: int
    cached: int
    swap_total: int
    swap_free: int


@dataclass(frozen=True)
class MemoryOnlined:
    blocks_onlined: int
    bytes_onlined: int
    failures: tuple[str, ...]
    mem_total: int


@dataclass(frozen=True)
class TemplatePrepared:
    """What PrepareTemplate did. ``modules_loaded`` counts the modules this call loaded itself (the
    others were loaded already); ``caches_dropped`` is False when the agent does not own the kernel.
    """

    modules_listed: int
    modules_loaded: int
    failures: tuple[str, ...]
    caches_dropped: bool


@dataclass(frozen=True)
class ExitStatus:
    """``exit_status``: exit code, or 128+signal. ``exited_at`` is timezone-aware UTC."""

    exit_status: int
    exited_at: datetime
    oom_killed: bool


@dataclass(frozen=True)
class Output:
    """A chunk of stdout/stderr; ``eof`` with empty ``data`` once the stream is finished."""

    data: bytes
    eof: bool


@dataclass(frozen=True)
class CpuStats:
    usage_usec: int
    user_usec: int
    system_usec: int
    nr_periods: int
    nr_throttled: int
    throttled_usec: int


@dataclass(frozen=True)
class MemoryStats:
    usage: int
    limit: int  # 0: unlimited
    max_usage: int
    anon: int
    file: int
    inactive_file: int
    active_file: int
    pgfault: int
    pgmajfault: int
    swap_usage: int
    swap_limit: int
    oom_kill: int


@dataclass(frozen=True)
class PidsStats:
    current: int
    limit: int  # 0: unlimited


@dataclass(frozen=True)
class ContainerStats:
    cgroup_version: int
    cpu: CpuStats
    memory: MemoryStats
    pids: PidsStats


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    exec_id: str
    is_init: bool
