"""Every pyvm metric, declared in one place, and the interface the shim feeds them through.

Names follow Prometheus conventions: ``pyvm_`` prefix, base units (bytes, seconds), counters end in
``_total``, unitless gauges are counts (``threads``, ``open_fds``) or ``_info``. Each metric has a
one-line help. ``tests/unit/metrics`` enforces the naming rules by walking the registry.

Nothing here costs anything while nobody scrapes: values that exist anyway (process stats in /proc,
the memory policy's numbers, the guest's meminfo) are read by custom collectors *at scrape time*;
only events that would otherwise be lost (an RPC finished, a hotplug happened) are counted as they
happen, at the price of one lock and an add.

How the shim feeds it (one ``ShimMetrics`` per shim process, its own ``CollectorRegistry``)::

    metrics = ShimMetrics()                      # registry: metrics.registry (never the global one)
    metrics.set_sandbox_source(sandbox)          # anything implementing SandboxSource, below
    closer = await serve_metrics(sandbox_dir.metrics_sock, metrics)   # shim.metrics_server

    # in the ttrpc/gRPC interceptor (once, not in each handler):
    metrics.observe_rpc("Create", Code.OK, seconds)   # polling methods: sum/count only
    # in the event forwarder:
    metrics.event_published(ok=True)
    # sandbox layer:
    metrics.observe_sandbox_start(seconds)       # Create of the sandbox → VM up, agent answering
    metrics.observe_boot(seconds)                # QEMU launched → guest agent answering
    # memory policy / QEMU layer (direction "grow"|"shrink", mechanism "acpi"|"virtio-mem"):
    metrics.observe_hotplug("grow", "acpi", seconds, nbytes)
    metrics.hotplug_failed("grow", "acpi", reason="qmp_error")  # short snake_case reason
    # agent client, around every agent RPC:
    metrics.observe_agent_rpc("CreateContainer", Code.OK, seconds)
    # shutdown, after the VM is gone:
    metrics.set_sandbox_source(None); await closer.close(); await metrics.aclose()

``SandboxSource`` is read at scrape time, on the event loop thread that serves the scrape, so its
sync methods must be cheap and must not block (return cached numbers; never call QMP or the agent
from them). ``guest_stats`` is the one coroutine: it may talk to the agent; the scrape bounds it with
a timeout (``ShimMetrics.refresh``) and serves what it has — a call still running after the timeout
is left to finish (and shared by the next scrape) rather than started again, so a hung agent costs one
pending call, not one per scrape. Any method may return ``None`` (not booted yet, gone): the metrics
that depend on it are left out of that scrape. A method that raises is logged and treated like
``None``; it never fails the scrape.

PIDs must be those of live children: return ``None`` once QEMU or virtiofsd has been reaped, or the
collectors may read a recycled PID.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shim.errors import Code
from shim.log import get_logger

_log = get_logger("shim.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets are few on purpose: every bucket is one line per label set per sandbox in the node
# monitor's output, and with the monitor's four labels a line is ~230 bytes (budget: < 20 KiB per
# sandbox, hack/bench-monitor.py). Decades are enough to tell "fast" from "slow" from "stuck".
RPC_BUCKETS = (0.1, 1.0)  # polls answer in ms; Create boots a VM (seconds)
BOOT_BUCKETS = (2.0, 5.0, 15.0)  # KVM boots in ~1 s, TCG in 5-10 s (DESIGN.md)
START_BUCKETS = BOOT_BUCKETS
HOTPLUG_BUCKETS = (0.1, 1.0, 10.0)
MONITOR_SCRAPE_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.0)

#: guest /proc/meminfo fields exported (kB in the guest, bytes here); the rest is not worth the bytes.
GUEST_MEMINFO_FIELDS = (
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Cached",
    "AnonPages",
    "Shmem",
)
#: task RPCs containerd/CRI poll (or long-poll: Wait lasts as long as the process): their latency is
#: kept as sum and count (``pyvm_shim_poll_rpc_duration_seconds``), not as a histogram — most calls
#: of a running pod are these, and a histogram per polled method was a third of a pod's lines.
POLLING_METHODS = frozenset({"State", "Stats", "Pids", "Connect", "Wait"})
DIRECTIONS = frozenset({"grow", "shrink"})
MECHANISMS = frozenset({"acpi", "virtio-mem"})
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


# ---------------------------------------------------------------------------------------------------
# What the shim provides


@dataclass(frozen=True)
class MemoryState:
    """The VM's memory as the memory policy sees it, in bytes."""

    configured_bytes: int  # default_memory the guest boots with
    plugged_bytes: int  # hot-plugged on top of that (pc-dimms, or virtio-mem plugged size)
    max_bytes: int  # the most the VM can grow to (maxmem)
    target_bytes: int | None = None  # what the policy currently wants (default + Σ limits, rounded)


@dataclass(frozen=True)
class ContainerStats:
    """One container's cgroup usage inside the guest, as the agent reports it."""

    container_id: str
    memory_usage_bytes: int
    cpu_seconds: float
    memory_limit_bytes: int | None = None


@dataclass(frozen=True)
class GuestStats:
    """What the agent reports about the guest. ``meminfo`` values are bytes, keyed by /proc/meminfo
    field name (``MemTotal`` ...); ``load`` is the 1/5/15-minute load average."""

    meminfo: Mapping[str, int] = field(default_factory=dict)
    load: tuple[float, float, float] | None = None
    containers: Sequence[ContainerStats] = ()


@runtime_checkable
class SandboxSource(Protocol):
    """What the sandbox offers the metrics. See the module docstring for the threading contract."""

    def qemu_pid(self) -> int | None: ...

    def virtiofsd_pid(self) -> int | None: ...

    def accelerator(self) -> str | None:
        """``"tcg"`` or ``"kvm"``: the accelerator QEMU actually runs with."""
        ...

    def qemu_version(self) -> str | None: ...

    def memory_state(self) -> MemoryState | None: ...

    async def guest_stats(self) -> GuestStats | None:
        """Ask the agent; may be slow. Raising is fine (counted as a failure)."""
        ...


# ---------------------------------------------------------------------------------------------------
# /proc readers (also used by tests against their own process)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStats:
    cpu_seconds: float  # user + system
    rss_bytes: int
    threads: int
    open_fds: int | None  # None when /proc/<pid>/fd is not readable


@dataclass(frozen=True)
class PssStats:
    pss_bytes: int
    pss_shmem_bytes: int


def read_proc_stats(pid: int | str = "self", proc: Path = Path("/proc")) -> ProcStats | None:
    """CPU, RSS, threads and fds of one process, or ``None`` if it is gone."""
    base = proc / str(pid)
    try:
        stat = (base / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): utime=14, stime=15, num_threads=20, rss=24 (pages)
    utime, stime = int(rest[11]), int(rest[12])
    threads, rss_pages = int(rest[17]), int(rest[21])
    try:
        fds: int | None = len(os.listdir(base / "fd"))
    except OSError:
        fds = None
    return ProcStats((utime + stime) / _CLK_TCK, rss_pages * _PAGE_SIZE, threads, fds)


def read_pss(pid: int | str = "self", proc: Path = Path("/proc")) -> PssStats | None:
    """Proportional set size (and its shmem part) from ``smaps_rollup``, or ``None``."""
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Pss_Shmem"):
            values[key] = int(rest.split()[0]) * 1024
    if "Pss" not in values:
        return None
    return PssStats(values["Pss"], values.get("Pss_Shmem", 0))


# ---------------------------------------------------------------------------------------------------
# Scrape-time collectors


def _call(what: str, fn: Callable[[], object]) -> object:
    """A provider call that must never fail a scrape."""
    try:
        return fn()
    except Exception as exc:
        _log.warning("metrics provider failed", call=what, error=repr(exc))
        return None


class _SourceRef:
    """The current sandbox source, shared by the collectors; replaceable at any time."""

    def __init__(self) -> None:
        self.source: SandboxSource | None = None

    def pid(self, name: str) -> int | None:
        src = self.source
        if src is None:
            return None
        pid = _call(name, getattr(src, name))
        return pid if isinstance(pid, int) and pid > 0 else None


class _FamiliesCollector(Collector):
    """A collector whose metric families come from ``_families``: empty, they describe the collector
    to the registry (no scrape-time reads at registration); filled in, ``collect`` returns them."""

    def _families(self) -> Sequence[Metric]:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return self._families()


class _ShimProcessCollector(_FamiliesCollector):
    def __init__(self, proc: Path) -> None:
        self._proc = proc

    def _families(
        self,
    ) -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily("pyvm_shim_cpu_seconds", "CPU time (user+system) used by the shim process."),
            GaugeMetricFamily("pyvm_shim_resident_memory_bytes", "Resident memory of the shim process."),
            GaugeMetricFamily("pyvm_shim_open_fds", "File descriptors open in the shim process."),
            GaugeMetricFamily("pyvm_shim_threads", "Threads of the shim process."),
        )

    def collect(self) -> Iterable[Metric]:
        cpu, rss, fds, threads = self._families()
        st = read_proc_stats("self", self._proc)
        if st is None:
            return []
        cpu.add_metric([], st.cpu_seconds)
        rss.add_metric([], st.rss_bytes)
        threads.add_metric([], st.threads)
        out: list[Metric] = [cpu, rss, threads]
        if st.open_fds is not None:
            fds.add_metric([], st.open_fds)
            out.append(fds)
        return out


class _HypervisorCollector(_FamiliesCollector):
    def __init__(self, ref: _SourceRef, proc: Path) -> None:
        self._ref = ref
        self._proc = proc

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "pyvm_hypervisor_info",
                "Always 1; labels name the accelerator in use (tcg|kvm) and the QEMU version.",
                labels=["accelerator", "qemu_version"],
            ),
            CounterMetricFamily(
                "pyvm_hypervisor_cpu_seconds",
                "CPU time (user+system) of the VMM processes (guest vCPUs included).",
                labels=["process"],
            ),
            GaugeMetricFamily(
                "pyvm_hypervisor_resident_memory_bytes",
                "Resident memory of the VMM processes (guest RAM it has touched included).",
                labels=["process"],
            ),
            GaugeMetricFamily("pyvm_hypervisor_threads", "Threads of the VMM processes.", labels=["process"]),
        )

    def collect(self) -> Iterable[Metric]:
        src = self._ref.source
        if src is None:
            return []
        info, cpu, rss, threads = self._families()
        accel = _call("accelerator", src.accelerator)
        version = _call("qemu_version", src.qemu_version)
        if accel is not None or version is not None:
            info.add_metric([str(accel or ""), str(version or "")], 1)
        for process, getter in (("qemu", "qemu_pid"), ("virtiofsd", "virtiofsd_pid")):
            pid = self._ref.pid(getter)
            st = read_proc_stats(pid, self._proc) if pid else None
            if st is None:
                continue
            cpu.add_metric([process], st.cpu_seconds)
            rss.add_metric([process], st.rss_bytes)
            threads.add_metric([process], st.threads)
        return [m for m in (info, cpu, rss, threads) if m.samples]


class _MemoryCollector(_FamiliesCollector):
    def __init__(self, ref: _SourceRef) -> None:
        self._ref = ref

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "pyvm_memory_configured_bytes", "Memory the guest boots with (default_memory)."
            ),
            GaugeMetricFamily(
                "pyvm_memory_plugged_bytes", "Memory hot-plugged into the VM on top of the boot size."
            ),
            GaugeMetricFamily("pyvm_memory_max_bytes", "The most memory the VM can grow to (maxmem)."),
            GaugeMetricFamily("pyvm_memory_target_bytes", "Memory the policy wants the VM to have now."),
        )

    def collect(self) -> Iterable[Metric]:
        src = self._ref.source
        state = _call("memory_state", src.memory_state) if src is not None else None
        if not isinstance(state, MemoryState):
            return []
        configured, plugged, maximum, target = self._families()
        configured.add_metric([], state.configured_bytes)
        plugged.add_metric([], state.plugged_bytes)
        maximum.add_metric([], state.max_bytes)
        out = [configured, plugged, maximum]
        if state.target_bytes is not None:
            target.add_metric([], state.target_bytes)
            out.append(target)
        return out


class _GuestCollector(_FamiliesCollector):
    def __init__(self, owner: ShimMetrics) -> None:
        self._owner = owner

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily
    ]:
        return (
            GaugeMetricFamily(
                "pyvm_guest_meminfo_bytes",
                "Guest /proc/meminfo, by field (MemTotal, MemAvailable, ...).",
                labels=["field"],
            ),
            GaugeMetricFamily(
                "pyvm_guest_load_average", "Guest load average over 1m, 5m and 15m.", labels=["period"]
            ),
            GaugeMetricFamily(
                "pyvm_guest_container_memory_usage_bytes",
                "Memory usage of a container's cgroup inside the guest.",
                labels=["container_id"],
            ),
            GaugeMetricFamily(
                "pyvm_guest_container_memory_limit_bytes",
                "Memory limit of a container's cgroup inside the guest.",
                labels=["container_id"],
            ),
            CounterMetricFamily(
                "pyvm_guest_container_cpu_seconds",
                "CPU time used by a container's cgroup inside the guest.",
                labels=["container_id"],
            ),
        )

    def collect(self) -> Iterable[Metric]:
        stats = self._owner.latest_guest_stats()
        if stats is None:
            return []
        meminfo, load, mem_usage, mem_limit, cpu = self._families()
        for name in GUEST_MEMINFO_FIELDS:
            value = stats.meminfo.get(name)
            if value is not None:
                meminfo.add_metric([name], value)
        if stats.load is not None:
            for period, avg in zip(("1m", "5m", "15m"), stats.load, strict=True):
                load.add_metric([period], avg)
        for c in stats.containers:
            mem_usage.add_metric([c.container_id], c.memory_usage_bytes)
            cpu.add_metric([c.container_id], c.cpu_seconds)
            if c.memory_limit_bytes is not None:
                mem_limit.add_metric([c.container_id], c.memory_limit_bytes)
        return [m for m in (meminfo, load, mem_usage, mem_limit, cpu) if m.samples]


class _PodOverheadCollector(_FamiliesCollector):
    """Host memory of the pod's processes, and the part of it that is not guest RAM.

    Guest RAM is a memfd (``share=on``) mapped by both QEMU and virtiofsd. PSS splits shared pages
    between the processes that map them, so ``Σ PSS`` counts guest RAM once (RSS would count it twice).
    The shmem part of that sum is guest RAM the guest has touched, never more than it was given
    (configured + plugged); overhead is everything else::

        overhead = Σ PSS - min(Σ Pss_Shmem, configured + plugged)
    """

    def __init__(self, ref: _SourceRef, proc: Path) -> None:
        self._ref = ref
        self._proc = proc

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "pyvm_pod_memory_pss_bytes",
                "Proportional set size of the pod's host processes together (shim, qemu, virtiofsd).",
            ),
            GaugeMetricFamily(
                "pyvm_pod_overhead_memory_bytes",
                "Host memory of the pod's processes beyond the guest RAM they back (sum of PSS minus guest memory).",
            ),
        )

    def collect(self) -> Iterable[Metric]:
        src = self._ref.source
        if src is None:
            return []
        pss_family, overhead = self._families()
        total = shmem = 0
        qemu_pid = self._ref.pid("qemu_pid")
        for pid in (os.getpid(), qemu_pid, self._ref.pid("virtiofsd_pid")):  # shim, qemu, virtiofsd
            pss = read_pss(pid, self._proc) if pid else None
            if pss is None:
                continue
            total += pss.pss_bytes
            shmem += pss.pss_shmem_bytes
        # one number per pod: the per-process split is in pyvm_hypervisor_resident_memory_bytes
        out: list[Metric] = []
        if total:
            pss_family.add_metric([], total)
            out.append(pss_family)
        state = _call("memory_state", src.memory_state)
        if isinstance(state, MemoryState) and qemu_pid is not None and total:
            given = state.configured_bytes + state.plugged_bytes
            overhead.add_metric([], max(0, total - min(shmem, given)))
            out.append(overhead)
        return out


# ---------------------------------------------------------------------------------------------------
# The shim's metrics


def _code_name(code: Code | int | str) -> str:
    if isinstance(code, str):
        return code
    try:
        return Code(int(code)).name
    except ValueError:
        return str(int(code))


def _check_hotplug_labels(direction: str, mechanism: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"hotplug direction must be one of {sorted(DIRECTIONS)}, not {direction!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"hotplug mechanism must be one of {sorted(MECHANISMS)}, not {mechanism!r}")


class ShimMetrics:
    """All metrics of one shim process, on a private ``CollectorRegistry``.

    Thread-safe for the ``observe_*`` methods (prometheus_client locks); ``refresh`` must run on the
    event loop that owns the sandbox source.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        guest_timeout: float = 1.0,
        guest_max_age: float = 15.0,
        proc: Path = Path("/proc"),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.guest_timeout = guest_timeout
        self.guest_max_age = guest_max_age
        self._ref = _SourceRef()
        self._guest: GuestStats | None = None
        self._guest_at = 0.0
        self._guest_task: asyncio.Task[GuestStats | None] | None = None
        r = self.registry

        self.rpc_duration = Histogram(
            "pyvm_shim_rpc_duration_seconds",
            "Duration of task API RPCs served by the shim (polling ones excluded), by method and status code.",
            ["method", "code"],
            registry=r,
            buckets=RPC_BUCKETS,
        )
        self.poll_rpc_duration = Summary(
            "pyvm_shim_poll_rpc_duration_seconds",
            "Duration of polling task API RPCs (State, Stats, Pids, Connect, Wait), by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.events_published = Counter(
            "pyvm_shim_events_published_total", "Task events the shim published to containerd.", registry=r
        )
        self.events_failed = Counter(
            "pyvm_shim_event_publish_failures_total",
            "Task events the shim failed to publish to containerd.",
            registry=r,
        )
        self.sandbox_start_duration = Histogram(
            "pyvm_sandbox_start_duration_seconds",
            "Time from the sandbox's Create request to a ready sandbox (VM booted, agent answering).",
            registry=r,
            buckets=START_BUCKETS,
        )
        self.boot_duration = Histogram(
            "pyvm_hypervisor_boot_duration_seconds",
            "Time from launching QEMU to the guest agent answering.",
            registry=r,
            buckets=BOOT_BUCKETS,
        )
        self.hotplug_ops = Counter(
            "pyvm_memory_hotplug_operations_total",
            "Completed memory hotplug operations, by direction (grow|shrink) and mechanism (acpi|virtio-mem).",
            ["direction", "mechanism"],
            registry=r,
        )
        self.hotplug_bytes = Counter(
            "pyvm_memory_hotplug_bytes_total",
            "Memory added or removed by completed hotplug operations.",
            ["direction", "mechanism"],
            registry=r,
        )
        self.hotplug_duration = Histogram(
            "pyvm_memory_hotplug_duration_seconds",
            "Duration of completed memory hotplug operations, guest onlining included.",
            ["direction", "mechanism"],
            registry=r,
            buckets=HOTPLUG_BUCKETS,
        )
        self.hotplug_failures = Counter(
            "pyvm_memory_hotplug_failures_total",
            "Failed memory hotplug operations, by direction, mechanism and reason.",
            ["direction", "mechanism", "reason"],
            registry=r,
        )
        # sum and count only (mean latency, rate, errors): a histogram here was ~40% of a pod's lines
        self.agent_rpc_duration = Summary(
            "pyvm_agent_rpc_duration_seconds",
            "Duration of RPCs the shim made to the guest agent (long polls excluded), by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.guest_stats_failures = Counter(
            "pyvm_guest_stats_failures_total",
            "Scrapes that got no fresh guest stats from the agent, by reason (timeout|error).",
            ["reason"],
            registry=r,
        )
        r.register(_ShimProcessCollector(proc))
        r.register(_HypervisorCollector(self._ref, proc))
        r.register(_MemoryCollector(self._ref))
        r.register(_GuestCollector(self))
        r.register(_PodOverheadCollector(self._ref, proc))

    # -- feeding -----------------------------------------------------------------------------------

    def set_sandbox_source(self, source: SandboxSource | None) -> None:
        """Where scrape-time numbers come from; ``None`` while there is no VM."""
        self._ref.source = source
        self._guest = None
        task, self._guest_task = self._guest_task, None
        if task is not None and not task.done():
            task.cancel()  # its result would belong to the previous source

    def observe_rpc(self, method: str, code: Code | int | str, seconds: float) -> None:
        family = self.poll_rpc_duration if method in POLLING_METHODS else self.rpc_duration
        family.labels(method, _code_name(code)).observe(seconds)

    def event_published(self, ok: bool) -> None:
        (self.events_published if ok else self.events_failed).inc()

    def observe_sandbox_start(self, seconds: float) -> None:
        self.sandbox_start_duration.observe(seconds)

    def observe_boot(self, seconds: float) -> None:
        self.boot_duration.observe(seconds)

    def observe_hotplug(self, direction: str, mechanism: str, seconds: float, nbytes: int) -> None:
        """A hotplug operation completed (QEMU confirmed it and the guest onlined/offlined it)."""
        _check_hotplug_labels(direction, mechanism)
        self.hotplug_ops.labels(direction, mechanism).inc()
        self.hotplug_bytes.labels(direction, mechanism).inc(nbytes)
        self.hotplug_duration.labels(direction, mechanism).observe(seconds)

    def hotplug_failed(self, direction: str, mechanism: str, reason: str) -> None:
        """A hotplug operation failed. ``reason`` is a short snake_case word from a fixed set the
        caller owns (``qmp_error``, ``timeout``, ``no_slots``, ``max_exceeded``, ``guest_online``...);
        anything else is recorded as ``other`` to keep the label set bounded."""
        _check_hotplug_labels(direction, mechanism)
        if not _REASON_RE.fullmatch(reason):
            reason = "other"
        self.hotplug_failures.labels(direction, mechanism, reason).inc()

    def observe_agent_rpc(self, method: str, code: Code | int | str, seconds: float) -> None:
        self.agent_rpc_duration.labels(method, _code_name(code)).observe(seconds)

    # -- scrape time -------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch guest stats for the coming render, waiting at most ``guest_timeout``.

        Never raises (except ``CancelledError``). A call that times out keeps running and is shared by
        later scrapes; its result is used while younger than ``guest_max_age``.
        """
        src = self._ref.source
        if src is None:
            return
        task = self._guest_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch_guest(src), name="metrics-guest-stats")
            self._guest_task = task
        done, _ = await asyncio.wait({task}, timeout=self.guest_timeout)
        if not done:
            self.guest_stats_failures.labels("timeout").inc()

    async def _fetch_guest(self, src: SandboxSource) -> GuestStats | None:
        try:
            stats = await src.guest_stats()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("guest stats failed", error=repr(exc))
            self.guest_stats_failures.labels("error").inc()
            return None
        if stats is not None and self._ref.source is src:
            self._guest, self._guest_at = stats, time.monotonic()
        return stats

    def latest_guest_stats(self) -> GuestStats | None:
        if self._guest is None or time.monotonic() - self._guest_at > self.guest_max_age:
            return None
        return self._guest

    def render(self) -> bytes:
        """The registry in Prometheus text format (0.0.4)."""
        return render(self.registry)

    async def aclose(self) -> None:
        """Cancel a guest-stats call still in flight."""
        task, self._guest_task = self._guest_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------
# The node monitor's own metrics


class MonitorMetrics:
    """Health metrics of ``pyvm monitor`` on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.running_shims = Gauge(
            "pyvm_monitor_running_shims",
            "Sandboxes with a metrics socket found at the last scrape.",
            registry=r,
        )
        self.scrapes = Counter(
            "pyvm_monitor_scrapes_total", "Requests for /metrics the monitor has served.", registry=r
        )
        self.scrape_failures = Counter(
            "pyvm_monitor_scrape_failures_total",
            "Shim scrapes that failed, by reason (timeout|connect|protocol).",
            ["reason"],
            registry=r,
        )
        self.scrape_duration = Histogram(
            "pyvm_monitor_scrape_duration_seconds",
            "Duration of scraping one shim's metrics socket, failures included.",
            registry=r,
            buckets=MONITOR_SCRAPE_BUCKETS,
        )
        for reason in ("timeout", "connect", "protocol"):
            self.scrape_failures.labels(reason)

    def render(self) -> bytes:
        return render(self.registry)


# ---------------------------------------------------------------------------------------------------
# Exposition


class _WithoutCreated(Collector):
    """prometheus_client adds a ``*_created`` gauge per counter/histogram label set; in the 0.0.4 text
    format it is just more bytes per sandbox, so it is left out."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            if any(s.name == created for s in metric.samples):
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


def render(registry: CollectorRegistry) -> bytes:
    """``registry`` in Prometheus text format 0.0.4, without ``_created`` series."""
    return generate_latest(_WithoutCreated(registry))


__all__ = [
    "CONTENT_TYPE",
    "GUEST_MEMINFO_FIELDS",
    "ContainerStats",
    "GuestStats",
    "MemoryState",
    "MonitorMetrics",
    "ProcStats",
    "PssStats",
    "SandboxSource",
    "ShimMetrics",
    "read_proc_stats",
    "read_pss",
    "render",
]
