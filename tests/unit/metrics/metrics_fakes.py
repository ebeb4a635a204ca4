"""Fake sandboxes for the metrics tests, the monitor integration test and hack/bench-monitor.py.

``FakeSandboxSource`` implements ``shim.metrics.SandboxSource`` without a VM; ``start_fake_sandbox``
lays out ``<run root>/sbs/<id>/`` like a shim would (``state.json`` with CRI annotations, a real
``serve_metrics`` endpoint on ``metrics.sock``). When the real shim serves metrics, an end-to-end
test swaps these for real pods and keeps its assertions.

(Would live in ``shim/testing/`` — not this engineer's path; see the report.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shim.errors import Code
from shim.metrics import ContainerStats, GuestStats, MemoryState, ShimMetrics
from shim.metrics_server import MetricsServer, serve_metrics

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class FakeSandboxSource:
    """A VM that isn't there. PIDs default to the calling process so /proc reads are real."""

    qemu: int | None = field(default_factory=os.getpid)
    virtiofsd: int | None = field(default_factory=os.getpid)
    accel: str | None = "tcg"
    version: str | None = "7.2.0"
    configured_bytes: int = 512 * MiB
    plugged_bytes: int = 0
    max_bytes: int = 4 * GiB
    guest_kernel_reserved: int = 40 * MiB  # MemTotal is a bit less than the RAM given
    guest_delay: float = 0.0
    guest_error: Exception | None = None
    #: CRI container ids are 64 hex digits (the pause container's is the sandbox id)
    containers: list[str] = field(default_factory=lambda: [sandbox_id(900), sandbox_id(901)])
    #: the real source (shim.sandbox.metrics_source) has no load average: the agent does not report it
    load: tuple[float, float, float] | None = (0.25, 0.1, 0.05)
    guest_calls: int = 0

    def qemu_pid(self) -> int | None:
        return self.qemu

    def virtiofsd_pid(self) -> int | None:
        return self.virtiofsd

    def accelerator(self) -> str | None:
        return self.accel

    def qemu_version(self) -> str | None:
        return self.version

    def memory_state(self) -> MemoryState | None:
        return MemoryState(
            self.configured_bytes,
            self.plugged_bytes,
            self.max_bytes,
            self.configured_bytes + self.plugged_bytes,
        )

    def guest_mem_total(self) -> int:
        return self.configured_bytes + self.plugged_bytes - self.guest_kernel_reserved

    async def guest_stats(self) -> GuestStats | None:
        self.guest_calls += 1
        if self.guest_delay:
            await asyncio.sleep(self.guest_delay)
        if self.guest_error is not None:
            raise self.guest_error
        total = self.guest_mem_total()
        return GuestStats(
            meminfo={
                "MemTotal": total,
                "MemFree": total // 2,
                "MemAvailable": total * 3 // 5,
                "Buffers": 4 * MiB,
                "Cached": 60 * MiB,
                "AnonPages": 30 * MiB,
                "Shmem": 2 * MiB,
                "Slab": 12 * MiB,
                "HugePages_Total": 0,  # not exported
            },
            load=self.load,
            containers=[
                ContainerStats(cid, (8 + 16 * i) * MiB, 0.5 + i, 256 * MiB if i else None)
                for i, cid in enumerate(self.containers)
            ],
        )

    def hot_add(self, nbytes: int, metrics: ShimMetrics | None = None, seconds: float = 0.3) -> None:
        """What a completed pc-dimm grow looks like from the outside."""
        self.plugged_bytes += nbytes
        if metrics is not None:
            metrics.observe_hotplug("grow", "acpi", seconds, nbytes)


def populate_running_pod(metrics: ShimMetrics, containers: int = 2) -> None:
    """Events a CRI pod with ``containers`` containers leaves behind after starting and being polled."""
    metrics.observe_sandbox_start(7.5)
    metrics.observe_boot(5.2)
    for method, n, secs in (
        ("Connect", 1, 0.0004),
        ("Create", containers, 1.2),
        ("Start", containers, 0.05),
        ("State", 4, 0.0008),
        ("Stats", 6, 0.004),
        ("Wait", 0, 0.0),
        ("Pids", 1, 0.002),
    ):
        for _ in range(n):
            metrics.observe_rpc(method, Code.OK, secs)
    metrics.observe_rpc("Kill", Code.NOT_FOUND, 0.001)
    # what the real shim times (shim.sandbox.metrics_source.TimedTtrpc: long polls excluded)
    for method, n, secs in (
        ("CreateSandbox", 1, 0.2),
        ("GuestDetails", 1, 0.01),
        ("OnlineMemory", 1, 0.4),
        ("CreateContainer", containers, 0.3),
        ("StartContainer", containers, 0.02),
        ("StatsContainer", 6, 0.003),  # containerd's Stats (the metrics' own calls are not timed)
    ):
        for _ in range(n):
            metrics.observe_agent_rpc(method, Code.OK, secs)
    for _ in range(containers):
        metrics.event_published(ok=True)
        metrics.event_published(ok=True)


@dataclass
class FakeSandbox:
    sandbox_id: str
    dir: Path
    source: FakeSandboxSource
    metrics: ShimMetrics
    server: MetricsServer
    cri: dict[str, str]

    async def close(self) -> None:
        await self.server.close()
        await self.metrics.aclose()


def cri_annotations(name: str, namespace: str = "default", uid: str | None = None) -> dict[str, str]:
    return {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-uid": uid or str(uuid.uuid4()),
        "io.kubernetes.cri.sandbox-name": name,
        "io.kubernetes.cri.sandbox-namespace": namespace,
    }


async def start_fake_sandbox(
    run_root: Path,
    sandbox_id: str,
    *,
    annotations: dict[str, str] | None = None,
    source: FakeSandboxSource | None = None,
    populate: bool = True,
    guest_timeout: float = 1.0,
) -> FakeSandbox:
    """``<run_root>/sbs/<id>/`` with state.json (if ``annotations``) and a live metrics.sock."""
    sbdir = run_root / "sbs" / sandbox_id
    sbdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if annotations is not None:
        state = {"id": sandbox_id, "annotations": annotations}
        (sbdir / "state.json").write_text(json.dumps(state))
    src = source or FakeSandboxSource()
    metrics = ShimMetrics(guest_timeout=guest_timeout)
    metrics.set_sandbox_source(src)
    if populate:
        populate_running_pod(metrics, containers=len(src.containers))
    server = await serve_metrics(sbdir / "metrics.sock", metrics)
    cri = {
        "cri_uid": (annotations or {}).get("io.kubernetes.cri.sandbox-uid", ""),
        "cri_name": (annotations or {}).get("io.kubernetes.cri.sandbox-name", ""),
        "cri_namespace": (annotations or {}).get("io.kubernetes.cri.sandbox-namespace", ""),
    }
    return FakeSandbox(sandbox_id, sbdir, src, metrics, server, cri)


class HungSocket:
    """A unix socket that accepts and then never answers: a wedged shim."""

    def __init__(self) -> None:
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.accepted = 0

    async def start(self, path: Path) -> HungSocket:
        path.parent.mkdir(parents=True, exist_ok=True)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            await self._release.wait()
            writer.close()

        self._server = await asyncio.start_unix_server(handle, path=str(path))
        return self

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def sandbox_id(n: int) -> str:
    """A 64-hex-digit id like containerd's."""
    return (f"{n:04x}" + uuid.uuid5(uuid.NAMESPACE_OID, str(n)).hex * 2)[:64]


def promtool_check(text: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on ``text`` (exit 0 and no lint output expected)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise AssertionError("promtool missing: install Debian's 'prometheus' package (hack/setup.sh does)")
    return subprocess.run(
        [promtool, "check", "metrics"], input=text.decode(), capture_output=True, text=True, timeout=60
    )
