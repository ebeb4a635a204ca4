"""The VM sandbox as seen by the metrics: a ``shim.metrics.SandboxSource`` over ``VmSandbox`` state,
and a timing wrapper for the agent connection.

Read at scrape time on the event loop (see ``shim.metrics``): the sync methods only read attributes
that ``VmSandbox`` / ``QemuVM`` already hold (pids of live children, the accelerator verdict, the
memory mechanism's last known state); ``guest_stats`` is the one that talks to the agent, under
``GUEST_STATS_TIMEOUT`` seconds (times the accelerator's speed factor) in total.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING, Any

from shim.agentclient.client import TIMEOUTS as AGENT_TIMEOUTS
from shim.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    QMPCommandError,
    ResourceExhausted,
    ShimError,
    Unavailable,
    code_of,
)
from shim.log import get_logger
from shim.metrics import ContainerStats, GuestStats, MemoryState, ShimMetrics

if TYPE_CHECKING:
    from shim.sandbox.vm import VmSandbox

log = get_logger("pyvm.sandbox.metrics")

#: budget for one guest-stats collection (GetMemInfo + one StatsContainer per container), before
#: the accelerator's speed factor; ShimMetrics waits less than this per scrape and shares the call.
GUEST_STATS_TIMEOUT = 5.0
#: set while the metrics collect guest stats: those agent calls are not timed (metrics measuring
#: their own collection would add series to every pod and skew StatsContainer)
_collecting: contextvars.ContextVar[bool] = contextvars.ContextVar("pyvm_metrics_collecting", default=False)


class VmMetricsSource:
    """Implements ``shim.metrics.SandboxSource`` for one ``VmSandbox``. Every method answers
    ``None`` while there is no VM (before the first Create, after shutdown or VM death)."""

    def __init__(self, sandbox: VmSandbox) -> None:
        self._sb = sandbox
        self._qemu_version: str | None = None

    def _live_vm(self) -> Any:
        vm = self._sb.vm
        if vm is None or vm.exited.done():
            return None
        return vm

    def qemu_pid(self) -> int | None:
        vm = self._live_vm()
        q = vm.qemu if vm is not None else None
        return q.pid if q is not None and q.returncode is None else None

    def virtiofsd_pid(self) -> int | None:
        vm = self._live_vm()
        v = vm.virtiofsd if vm is not None else None
        return v.pid if v is not None and v.returncode is None else None

    def accelerator(self) -> str | None:
        vm = self._live_vm()
        return str(vm.accel.accel) if vm is not None else None

    def qemu_version(self) -> str | None:
        return self._qemu_version if self._live_vm() is not None else None

    def memory_state(self) -> MemoryState | None:
        vm = self._live_vm()
        if vm is None or vm.memory is None:
            return None
        st = vm.memory.state()  # cached: what QEMU reported after the last refresh/resize
        try:
            target: int | None = self._sb.memory_target()
        except ShimError:
            target = None
        return MemoryState(st.boot_bytes, st.plugged_bytes, st.max_bytes, target)

    async def guest_stats(self) -> GuestStats | None:
        vm, agent = self._live_vm(), self._sb.agent
        if vm is None or agent is None or agent.closed:
            return None
        _collecting.set(True)  # guest_stats runs in its own task (ShimMetrics.refresh): stays there
        async with asyncio.timeout(GUEST_STATS_TIMEOUT * vm.accel.speed_factor):
            if self._qemu_version is None and vm.qmp is not None:
                v = (await vm.qmp.execute("query-version")).get("qemu", {})
                self._qemu_version = f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"
            mi = await agent.mem_info()
            containers = []
            for cid in self._sb.container_ids():
                try:
                    s = await agent.stats_container(cid)
                except ShimError as exc:  # e.g. removed meanwhile: leave it out of this scrape
                    log.debug("container stats failed", container_id=cid, error=str(exc))
                    continue
                containers.append(
                    ContainerStats(cid, s.memory.usage, s.cpu.usage_usec / 1e6, s.memory.limit or None)
                )
        return GuestStats(
            meminfo={
                "MemTotal": mi.mem_total,
                "MemFree": mi.mem_free,
                "MemAvailable": mi.mem_available,
                "Cached": mi.cached,
            },
            containers=containers,
        )


#: hotplug failure reasons (``pyvm_memory_hotplug_failures_total{reason}``), by error class; first match
_FAILURE_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (ResourceExhausted, "resource_exhausted"),  # over max_memory, or no free DIMM slot
    (DeadlineExceeded, "timeout"),  # QEMU/the guest did not confirm in time
    (FailedPrecondition, "guest_refused"),  # e.g. a DIMM the guest will not release (not movable)
    (QMPCommandError, "qmp_error"),
    (Unavailable, "vm_gone"),
)


def hotplug_failure_reason(exc: BaseException) -> str:
    for cls, reason in _FAILURE_REASONS:
        if isinstance(exc, cls):
            return reason
    return "other"


class HotplugObserver:
    """Records one VM memory resize (``VmSandbox._apply_memory``) in the hotplug metrics.

    ``mechanism`` is the configuration's ``memory_hotplug`` (``acpi`` | ``virtio-mem``); with
    ``none`` (or no metrics) nothing is recorded. The duration covers QEMU's confirmation and, for
    growth, the guest onlining the new blocks.
    """

    def __init__(self, metrics: ShimMetrics | None, mechanism: str, before: int, target: int) -> None:
        self._metrics = metrics if mechanism in ("acpi", "virtio-mem") else None
        self._mechanism = mechanism
        self._before = before
        self._direction = "grow" if target > before else "shrink"
        self._t0 = time.monotonic()

    def done(self, after: int) -> None:
        if self._metrics is None or after == self._before:
            return  # nothing moved (e.g. no DIMM small enough to remove): not an operation
        direction = "grow" if after > self._before else "shrink"
        seconds = time.monotonic() - self._t0
        self._metrics.observe_hotplug(direction, self._mechanism, seconds, abs(after - self._before))

    def failed(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.hotplug_failed(self._direction, self._mechanism, hotplug_failure_reason(exc))


class TimedTtrpc:
    """Wraps the agent's ttrpc ``Client``: every ``call`` that has a deadline is observed as
    ``pyvm_agent_rpc_duration_seconds``. Long polls (no deadline: WaitProcess, ReadStdout, ...)
    measure waiting, not the agent, and are left out. Everything else is delegated."""

    def __init__(self, inner: Any, metrics: ShimMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if AGENT_TIMEOUTS.get(method, 0) is None or _collecting.get():
            return await self._inner.call(service, method, *args, **kwargs)
        t0 = time.monotonic()
        code = Code.CANCELLED
        try:
            result = await self._inner.call(service, method, *args, **kwargs)
            code = Code.OK
            return result
        except ShimError as exc:
            code = code_of(exc)
            raise
        except TimeoutError:
            code = Code.DEADLINE_EXCEEDED
            raise
        except Exception:
            code = Code.UNKNOWN
            raise
        finally:
            self._metrics.observe_agent_rpc(method, code, time.monotonic() - t0)


__all__ = [
    "GUEST_STATS_TIMEOUT",
    "HotplugObserver",
    "TimedTtrpc",
    "VmMetricsSource",
    "hotplug_failure_reason",
]
