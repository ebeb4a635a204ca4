"""The VM sandbox: one QEMU VM per shim daemon, containers run by the guest agent (crun).

``VmSandbox`` implements ``shim.sandbox.backend.SandboxBackend``. Flow:

- the first ``create_container`` loads the configuration (containerd's ``ConfigPath`` option, else
  ``PYVM_CONFIG``, else ``/etc/pyvm/configuration.toml``, else built-in defaults), takes the
  accelerator verdict from the probe cache (probing once if there is none), makes the share a shared
  mount, boots the VM (``QemuVM``), waits for the agent's Health, has the guest mount the share
  (``CreateSandbox``) and learns the memory block size (``GuestDetails``);
- per container: rootfs and bind mounts into the share (``resources.storage``), the spec rewritten
  for the guest (``resources.spec``), the memory plan applied (``resources.memory`` -> ``vm.resize_memory``
  -> agent ``OnlineMemory``), then agent ``CreateContainer``; the host stdio ends are opened and
  relayed to/from the agent's long polls (``shim.sandbox.stdio``);
- ``wait`` returns after the agent reported the exit **and** both output relays wrote everything;
- QEMU dying unexpectedly resolves every pending ``wait`` with 137 (reason and console log logged);
  the sandbox then only accepts ``delete``/``shutdown``, which clean up without the agent.

Concurrency: everything runs on the event loop. ``_boot_lock`` makes the boot happen once;
``_mem_lock`` serializes memory plans (create/update/delete). Background work (OOM poll, output
relays) runs in named tasks in ``_tasks``; ``shutdown`` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shim import config as config_mod
from shim.agentclient import AgentClient
from shim.agentclient.types import Stdio as AgentStdio
from shim.config import Config
from shim.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
    Unavailable,
)
from shim.hypervisor.qemu.cmdline import TapNic
from shim.hypervisor.qemu.driver import ExitInfo, QemuVM
from shim.log import get_logger
from shim.metrics import ShimMetrics
from shim.paths import SHARE_TAG, SandboxDir
from shim.platform import accel
from shim.resources import memory as mem_policy
from shim.resources import network
from shim.resources.annotations import container_vcpus, cri_sandbox_vcpus, parse_pod_annotations
from shim.resources.spec import PodNamespaces, guest_hostname, is_cri, rewrite_spec
from shim.resources.storage import RootfsMount, SandboxStorage, cleanup_sandbox_share
from shim.sandbox.hostio import HostIO, open_host_io
from shim.sandbox.metrics_source import HotplugObserver, TimedTtrpc, VmMetricsSource
from shim.sandbox.spec import (
    ContainerRequest,
    ContainerStats,
    ExecRequest,
    ExitStatus,
    ProcessInfo,
    Resources,
    Stdio,
)
from shim.sandbox.template import boot_vm

log = get_logger("pyvm.sandbox")

T = TypeVar("T")

#: exit status of every process when the VM dies under it (as if SIGKILLed)
VM_DIED_STATUS = 137
#: after the agent channel broke, how long (x speed factor) to wait for QEMU's exit to be confirmed
VM_DEATH_GRACE_S = 0.5
#: after the exit is known, how long (x speed factor) the relays may still take to write the output
#: a leftover child can hold a pipe open forever; the agent already waited 2 s for EOF itself
DRAIN_GRACE_S = 5.0
GUEST_BUILD_HINT = "run `pyvm guest build` (or `.venv/bin/pyvm guest build --arch x86_64`)"


@dataclass
class _Proc:
    container_id: str
    exec_id: str
    stdio: Stdio
    io: HostIO
    process: Mapping[str, Any] | None = None  # exec: the OCI Process, run at start
    started: bool = False
    relays: list[asyncio.Task[None]] = field(default_factory=list)
    stdin_task: asyncio.Task[None] | None = None
    exit: ExitStatus | None = None

    async def stop_io(self) -> None:
        """Cancel the relays (awaiting them, so no fd is touched afterwards) and close the host ends."""
        tasks = [t for t in (*self.relays, self.stdin_task) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.io.close()


@dataclass
class _Container:
    id: str
    bundle: str
    memory_limit: int = 0
    guest_pid: int = 0  # its init in the guest (the pause process, for the pod sandbox container)
    procs: dict[str, _Proc] = field(default_factory=dict)


@dataclass(frozen=True)
class BootTimes:
    """Seconds since the first Create arrived (for logs and the benchmark)."""

    qemu_started: float = 0.0
    agent_ready: float = 0.0
    sandbox_ready: float = 0.0


class VmSandbox:
    """Implements ``SandboxBackend`` for one sandbox (pod) = one VM."""

    def __init__(
        self,
        sandbox_id: str,
        *,
        namespace: str = "",
        sdir: SandboxDir | None = None,
        metrics: ShimMetrics | None = None,
    ) -> None:
        """``metrics``: the shim's metrics; this sandbox becomes their source (boot, memory, guest)."""
        self.sandbox_id = sandbox_id
        self.namespace = namespace
        self.sdir = sdir or SandboxDir.for_sandbox(sandbox_id)
        self.storage = SandboxStorage(self.sdir)
        self.cfg: Config | None = None
        self.vm: QemuVM | None = None
        self.agent: AgentClient | None = None
        self.boot_times = BootTimes()
        self._containers: dict[str, _Container] = {}
        self._oom_callbacks: list[Callable[[str], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._boot_lock = asyncio.Lock()
        self._mem_lock = asyncio.Lock()
        self._dead: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._block = 128 * mem_policy.MiB
        self._sandbox_hint = 0
        self._closed = False
        #: the pod's network (CRI's netns) and the taps wiring it into the VM
        self.network: network.PodNetwork | None = None
        self._taps: list[network.Tap] = []
        self.metrics = metrics
        if metrics is not None:
            metrics.set_sandbox_source(VmMetricsSource(self))

    # -- SandboxBackend: sandbox-wide -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return (self.vm.pid or 0) if self.vm is not None else 0

    def on_oom(self, callback: Callable[[str], None]) -> None:
        self._oom_callbacks.append(callback)

    async def shutdown(self) -> None:
        """Destroy the guest sandbox, stop the VM, unmount and remove the share. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self.agent is not None and not self._dead.done() and self.vm is not None:
            with contextlib.suppress(ShimError, OSError, TimeoutError):
                async with asyncio.timeout(self.vm.timeouts.shutdown):
                    await self.agent.destroy_sandbox()
        if self.agent is not None:
            await self.agent.close()
        if self.vm is not None:
            info = await self.vm.stop()
            log.info("VM stopped", sandbox_id=self.sandbox_id, status=info.description)
        for c in list(self._containers.values()):
            for p in c.procs.values():
                await p.stop_io()
        self._containers.clear()
        if self.network is not None:
            await network.unwire(self.network.netns, self._taps)
        try:
            await asyncio.to_thread(cleanup_sandbox_share, self.sdir)
        except ShimError as exc:
            log.error("share cleanup failed", sandbox_id=self.sandbox_id, error=str(exc))

    # -- boot -------------------------------------------------------------------------------------------

    async def _ensure_vm(self, config_path: str, spec: Mapping[str, Any]) -> AgentClient:
        """Boot the sandbox's VM once, sized and named by ``spec``, the first container's; later
        calls return its agent. From the spec: the ``io.pyvm.*`` and CRI sizing annotations, the
        vCPUs a standalone container's own CPU limit asks for, the VM's hostname, and the pod's
        network namespace (CRI's), whose interfaces become the VM's NICs.

        :raises InvalidArgument: an ``io.pyvm.*`` annotation is unknown, not enabled by the node's
            ``[runtime] enable_annotations`` or malformed (the pod asked for something wrong).
        :raises FailedPrecondition: the node's configuration or guest image is not usable, or the
            run root is too long for this sandbox's unix socket paths.
        """
        async with self._boot_lock:
            self._require_alive()
            if self.agent is not None:
                return self.agent
            t0 = time.monotonic()
            try:
                cfg = config_mod.load(config_path or None)
            except InvalidArgument as exc:
                raise FailedPrecondition(f"pyvm configuration: {exc}") from exc
            annotations = spec.get("annotations") or {}
            overrides = parse_pod_annotations(
                annotations, cfg.runtime.enable_annotations
            ).hypervisor_overrides()
            host_cpus = os.cpu_count() or 1
            vcpus = cri_sandbox_vcpus(annotations, host_cpus=host_cpus)
            if vcpus is None and not is_cri(spec):
                resources = (spec.get("linux") or {}).get("resources") or {}
                vcpus = container_vcpus(resources, host_cpus=host_cpus)
            if vcpus is not None and "vcpus" not in overrides and vcpus > cfg.hypervisor.vcpus:
                overrides["vcpus"] = vcpus
            if overrides:
                cfg = config_mod.with_overrides(cfg, **overrides)
                log.info("pod overrides applied", sandbox_id=self.sandbox_id, **overrides)
            self.cfg = cfg
            self.sdir.check_socket_paths()  # else virtiofsd/QEMU die later: "Socket path too long"
            _check_guest_files(cfg)  # before the accelerator probe, which boots the guest kernel
            verdict = await accel.verdict_for(cfg.hypervisor)
            log.info(
                "accelerator",
                sandbox_id=self.sandbox_id,
                accel=verdict.accel,
                reason=verdict.reason,
                speed_factor=verdict.speed_factor,
            )
            if verdict.degraded:
                log.warning("guests run EMULATED under TCG (slow)", reason=verdict.reason)
            try:
                QemuVM(cfg, self.sdir, verdict).preflight()
            except FailedPrecondition as exc:
                raise FailedPrecondition(f"{exc}; {GUEST_BUILD_HINT}", **exc.facts) from exc
            self.sdir.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            await asyncio.to_thread(self.storage.prepare_share)
            nics = await self._wire_network(network.netns_path(spec))
            try:
                vm, agent = await boot_vm(
                    cfg, self.sdir, verdict, on_exit=self._vm_exited, created=self._set_vm, nics=nics
                )
            except BaseException:
                if self.network is not None:
                    await network.unwire(self.network.netns, self._taps)
                    self.network = None  # unwired: shutdown has nothing left to undo
                raise
            finally:
                for t in self._taps:
                    t.close()  # QEMU holds its own copies: the taps live as long as QEMU
            self.vm = vm
            t1 = vm.boot_started
            if self.metrics is not None:
                agent.ttrpc = TimedTtrpc(agent.ttrpc, self.metrics)  # type: ignore[assignment]
            self.agent = agent
            t2 = time.monotonic()
            net = self.network
            await agent.create_sandbox(
                sandbox_id=self.sandbox_id,
                hostname=guest_hostname(spec, socket.gethostname()),
                share_tag=SHARE_TAG,
                interfaces=net.interfaces if net else (),
                routes=net.routes if net else (),
            )
            details = await agent.guest_details()
            if details.memory_block_size:
                self._block = details.memory_block_size
                vm.set_memory_block_size(details.memory_block_size)
            t3 = time.monotonic()
            self.boot_times = BootTimes(t1 - t0, t2 - t0, t3 - t0)
            if self.metrics is not None:
                self.metrics.observe_boot(t2 - vm.boot_started)
                self.metrics.observe_sandbox_start(t3 - t0)
            log.info(
                "sandbox VM ready",
                sandbox_id=self.sandbox_id,
                accel=verdict.accel,
                boot=vm.boot.value,
                qemu_pid=vm.pid,
                guest_kernel=details.kernel_release,
                boot_id=details.boot_id,
                qemu_start_s=round(t1 - t0, 2),
                agent_ready_s=round(t2 - t0, 2),
                sandbox_ready_s=round(t3 - t0, 2),
            )
            self._spawn(self._oom_loop(), "oom-events")
            return agent

    async def _wire_network(self, netns: str | None) -> list[TapNic]:
        """Read the pod's network namespace and wire a tap to each of its interfaces; the NICs QEMU
        gets. None: no namespace to carry (a new one or the host's): the VM has loopback only."""
        if netns is None:
            return []
        self.network, self._taps = await network.wire(netns)
        return [TapNic(t.fd, t.mac, i) for i, t in enumerate(self._taps)]

    def _set_vm(self, vm: QemuVM) -> None:
        self.vm = vm

    def _vm_exited(self, info: ExitInfo) -> None:
        log.error(
            "the sandbox VM died: every process is reported killed (137)",
            sandbox_id=self.sandbox_id,
            qemu=info.description,
            console_log=str(self.sdir.postmortem / "console.log"),  # QemuVM kept the logs
            console_tail=info.console_tail[-1500:],
            qemu_log_tail=info.qemu_log_tail[-1500:],
        )
        if not self._dead.done():
            self._dead.set_result(info)

    def _require_alive(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} is shut down")
        if self._dead.done():
            info = self._dead.result()
            raise Unavailable(
                f"the VM of sandbox {self.sandbox_id} is gone (QEMU {info.description}); "
                f"see {self.sdir.postmortem / 'console.log'}"
            )

    def _agent(self) -> AgentClient:
        self._require_alive()
        if self.agent is None:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} has no VM yet")
        return self.agent

    async def _guarded(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless the VM dies first (then Unavailable)."""
        task = asyncio.ensure_future(aw)
        either: set[asyncio.Future[Any]] = {task, self._dead}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self._require_alive()
        raise AssertionError("unreachable")

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name} [{self.sandbox_id}]")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", task=task.get_name(), error=repr(task.exception()))

    async def _oom_loop(self) -> None:
        assert self.agent is not None
        while True:
            try:
                cid = await self.agent.get_oom_event()
            except ShimError as exc:
                if not self._dead.done() and not self._closed:
                    log.warning("OOM event stream ended", error=str(exc))
                return
            log.warning("container OOM", sandbox_id=self.sandbox_id, container_id=cid)
            for cb in self._oom_callbacks:
                cb(cid)

    # -- memory -----------------------------------------------------------------------------------------

    def _plan(self, limits: Mapping[str, int]) -> mem_policy.MemoryPlan:
        assert self.cfg is not None
        hv = self.cfg.hypervisor
        return mem_policy.plan(
            default=hv.default_memory * mem_policy.MiB,
            maximum=hv.max_memory * mem_policy.MiB,
            block=self._block,
            limits=limits,
            sandbox_hint=self._sandbox_hint,
        )

    async def _apply_memory(self, plan: mem_policy.MemoryPlan) -> None:
        """Resize the VM to ``plan.target``; newly plugged memory is onlined movable (so that it can
        be unplugged again). A refused shrink is logged, not raised (the cgroup limits still hold)."""
        vm, agent = self.vm, self._agent()
        assert vm is not None
        before = (await self._guarded(vm.memory_state())).total_bytes
        if plan.target == before:
            return
        assert self.cfg is not None
        observed = HotplugObserver(self.metrics, self.cfg.hypervisor.memory_hotplug, before, plan.target)
        try:
            state = await self._guarded(vm.resize_memory(plan.target))
        except ShimError as exc:
            observed.failed(exc)
            if isinstance(exc, FailedPrecondition) and plan.target < before:
                log.warning("the guest kept its memory (not movable)", error=str(exc))
                return
            raise
        grown = state.total_bytes - before
        if grown > 0:
            r = await self._guarded(
                agent.online_memory(movable=True, wait_for_bytes=grown, wait_s=vm.timeouts.agent)
            )
            if r.failures:
                log.warning("some memory blocks did not come online", failures=list(r.failures)[:8])
        observed.done(state.total_bytes)
        log.info(
            "VM memory resized",
            sandbox_id=self.sandbox_id,
            target_mib=plan.target // mem_policy.MiB,
            before_mib=before // mem_policy.MiB,
            now_mib=state.total_bytes // mem_policy.MiB,
        )

    def memory_target(self) -> int | None:
        """What the memory policy wants the VM to have now (``None`` before the VM is configured)."""
        return self._plan(self._limits()).target if self.cfg is not None else None

    def container_ids(self) -> list[str]:
        return list(self._containers)

    def _limits(self, override: tuple[str, int] | None = None) -> dict[str, int]:
        limits = {cid: c.memory_limit for cid, c in self._containers.items()}
        if override is not None:
            limits[override[0]] = override[1]
        return limits

    # -- containers -------------------------------------------------------------------------------------

    async def create_container(self, request: ContainerRequest) -> int:
        cid = request.id
        if cid in self._containers:
            raise FailedPrecondition(f"container {cid} already exists in sandbox {self.sandbox_id}")
        spec = _read_spec(request.bundle)
        if not self._containers and cid == self.sandbox_id:
            self._sandbox_hint = mem_policy.sandbox_memory_hint(spec.get("annotations") or {})
        agent = await self._ensure_vm(request.config_path, spec)
        limit = mem_policy.limit_of(_memory_limit((spec.get("linux") or {}).get("resources") or {}))
        mounted = False
        io: HostIO | None = None
        c = _Container(cid, request.bundle, memory_limit=limit)
        try:
            rootfs = [RootfsMount(m.type, m.source, m.target, tuple(m.options)) for m in request.rootfs]
            await asyncio.to_thread(self.storage.mount_rootfs, cid, rootfs, request.bundle)
            mounted = True
            shared = await asyncio.to_thread(self.storage.share_mounts, cid, spec.get("mounts") or [])
            guest = rewrite_spec(
                spec,
                container_id=cid,
                sandbox_id=self.sandbox_id,
                guest_mounts=shared.guest_paths,
                pod=self._pod_namespaces(cid),
            )
            log.debug("spec rewritten for the guest", container_id=cid, adjustments=guest.adjustments)
            terminal = bool((spec.get("process") or {}).get("terminal"))
            stdio = Stdio(request.stdio.stdin, request.stdio.stdout, request.stdio.stderr, terminal)
            io = await open_host_io(stdio, container_id=cid, namespace=self.namespace)
            async with self._mem_lock:
                plan = self._plan(self._limits((cid, limit)))
                await self._apply_memory(plan)
                pid = await self._guarded(agent.create_container(cid, guest.spec, _agent_stdio(stdio, io)))
                c.guest_pid = pid
                self._containers[cid] = c
            p = _Proc(cid, "", stdio, io)
            c.procs[""] = p
            self._start_relays(p)
        except BaseException:
            if io is not None:
                await io.close()
            if mounted:
                with contextlib.suppress(ShimError):
                    await asyncio.to_thread(self.storage.unmount_container, cid)
            raise
        log.info("container created in the VM", container_id=cid, guest_pid=pid, memory_limit=limit)
        return self.pid

    def _pod_namespaces(self, container_id: str) -> PodNamespaces | None:
        """The sandbox container whose ipc/uts/pid namespaces ``container_id`` may join, if it runs here."""
        sandbox = self._containers.get(self.sandbox_id)
        if container_id == self.sandbox_id or sandbox is None or not sandbox.guest_pid:
            return None
        return PodNamespaces(host_pid=self.pid, guest_pid=sandbox.guest_pid)

    async def start(self, container_id: str, exec_id: str) -> int:
        _, p = self._proc(container_id, exec_id)
        agent = self._agent()
        if not exec_id:
            await self._guarded(agent.start_container(container_id))
        else:
            assert p.process is not None
            await self._guarded(
                agent.exec_process(container_id, exec_id, p.process, _agent_stdio(p.stdio, p.io))
            )
            self._start_relays(p)
        p.started = True
        return self.pid

    async def exec(self, request: ExecRequest) -> None:
        c = self._container(request.container_id)
        self._require_alive()
        if request.exec_id in c.procs:
            raise FailedPrecondition(f"exec {request.exec_id} already exists")
        terminal = bool(request.process.get("terminal")) or request.stdio.terminal
        stdio = Stdio(request.stdio.stdin, request.stdio.stdout, request.stdio.stderr, terminal)
        io = await open_host_io(stdio, container_id=c.id, namespace=self.namespace)
        c.procs[request.exec_id] = _Proc(c.id, request.exec_id, stdio, io, process=dict(request.process))

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        _, p = self._proc(container_id, exec_id)
        if exec_id and not p.started:
            raise NotFound(f"exec {exec_id} of task {container_id} was never started")
        await self._guarded(self._agent().signal_process(container_id, exec_id, signal, all=all))

    async def wait(self, container_id: str, exec_id: str) -> ExitStatus:
        """The exit, after both output relays wrote everything; 137 if the VM dies first."""
        _, p = self._proc(container_id, exec_id)
        if p.exit is not None:
            return p.exit
        try:
            agent = self._agent()
            r = await self._guarded(agent.wait_process(container_id, exec_id))
            exit = ExitStatus(r.exit_status, r.exited_at)
            await self._drain(p)
        except Unavailable:
            # QEMU's death closes the agent channel before QEMU's exit is reaped: give the exit
            # watcher a moment to confirm it, or a killed VM would be reported as "lost" (255).
            if not self._dead.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._dead), self._death_grace())
            if not self._dead.done():
                raise
            exit = ExitStatus.now(VM_DIED_STATUS)
        p.exit = exit
        await p.stop_io()
        return exit

    def _death_grace(self) -> float:
        """How long a broken agent channel waits for QEMU's exit to be confirmed."""
        return VM_DEATH_GRACE_S * (self.vm.accel.speed_factor if self.vm is not None else 1.0)

    async def _drain(self, p: _Proc) -> None:
        relays = [t for t in p.relays if not t.done()]
        if not relays:
            return
        grace = DRAIN_GRACE_S * (self.vm.accel.speed_factor if self.vm else 1.0)
        _, pending = await asyncio.wait(relays, timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            log.warning(
                "output still open after the exit; stopped relaying",
                container_id=p.container_id,
                exec_id=p.exec_id or None,
            )
            await asyncio.wait(pending)

    async def pids(self, container_id: str) -> list[ProcessInfo]:
        c = self._container(container_id)
        # Guest pids mean nothing on the host: report the hypervisor (as Kata does), and one entry
        # per running exec so that `ctr task ps` shows them.
        infos = [ProcessInfo(self.pid)]
        infos += [
            ProcessInfo(self.pid, eid) for eid, p in c.procs.items() if eid and p.started and not p.exit
        ]
        return infos

    async def stats(self, container_id: str) -> ContainerStats:
        self._container(container_id)
        s = await self._guarded(self._agent().stats_container(container_id))
        m = s.memory
        return ContainerStats(
            cpu_usage_ns=s.cpu.usage_usec * 1000,
            cpu_user_ns=s.cpu.user_usec * 1000,
            cpu_system_ns=s.cpu.system_usec * 1000,
            memory_usage=m.usage,
            memory_limit=m.limit,
            memory_inactive_file=m.inactive_file,
            memory_anon=m.anon,
            memory_file=m.file,
            pgfault=m.pgfault,
            pgmajfault=m.pgmajfault,
            pids_current=s.pids.current,
            pids_limit=s.pids.limit,
            oom_kills=m.oom_kill,
        )

    async def update(self, container_id: str, resources: Resources) -> None:
        """Apply ``LinuxResources`` in the guest; resize the VM per the memory policy.

        :raises ResourceExhausted: the new target exceeds max memory; nothing was changed.
        """
        c = self._container(container_id)
        agent = self._agent()
        new_limit = mem_policy.limit_of(_memory_limit(resources.linux))
        has_memory = "memory" in resources.linux and "limit" in (resources.linux.get("memory") or {})
        async with self._mem_lock:
            if has_memory and new_limit != c.memory_limit:
                plan = self._plan(self._limits((container_id, new_limit)))  # raises before any change
                if new_limit > c.memory_limit or new_limit == 0:
                    await self._apply_memory(plan)
                    await self._guarded(agent.update_container(container_id, dict(resources.linux)))
                else:
                    await self._guarded(agent.update_container(container_id, dict(resources.linux)))
                    await self._apply_memory(plan)
                c.memory_limit = new_limit
            else:
                await self._guarded(agent.update_container(container_id, dict(resources.linux)))

    async def pause(self, container_id: str) -> None:
        self._container(container_id)
        await self._guarded(self._agent().pause_container(container_id))

    async def resume(self, container_id: str) -> None:
        self._container(container_id)
        await self._guarded(self._agent().resume_container(container_id))

    async def close_io(self, container_id: str, exec_id: str) -> None:
        _, p = self._proc(container_id, exec_id)
        if p.io.stdin is not None:
            p.io.stdin.request_close()  # the relay forwards what is buffered, then closes
        elif p.started or not exec_id:
            with contextlib.suppress(NotFound, FailedPrecondition):
                await self._guarded(self._agent().close_stdin(container_id, exec_id))

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        _, p = self._proc(container_id, exec_id)
        if exec_id and not p.started:
            return  # applied by nobody: the exec's pty does not exist yet (runc ignores it too)
        await self._guarded(self._agent().resize_tty(container_id, exec_id, rows=height, columns=width))

    async def delete(self, container_id: str, exec_id: str) -> None:
        c = self._containers.get(container_id)
        if c is None:
            return
        if exec_id:
            p = c.procs.pop(exec_id, None)
            if p is not None:
                await p.stop_io()
            return
        for p in c.procs.values():
            await p.stop_io()
        alive = self.agent is not None and not self._dead.done() and not self._closed
        if alive:
            assert self.agent is not None
            with contextlib.suppress(NotFound):
                await self._guarded(self.agent.remove_container(container_id))
        await asyncio.to_thread(self.storage.unmount_container, container_id)
        del self._containers[container_id]
        if alive and self.cfg is not None:
            async with self._mem_lock:
                try:
                    await self._apply_memory(self._plan(self._limits()))
                except ShimError as exc:
                    log.warning(
                        "memory shrink after delete failed", container_id=container_id, error=str(exc)
                    )
        log.info("container removed from the VM", container_id=container_id)

    # -- stdio relays -------------------------------------------------------------------------------

    def _start_relays(self, p: _Proc) -> None:
        tag = f"{p.container_id}/{p.exec_id or 'init'}"
        if p.io.stdout is not None:
            p.relays.append(self._spawn(self._relay_out(p, "stdout"), f"stdout {tag}"))
        if p.io.stderr is not None:
            p.relays.append(self._spawn(self._relay_out(p, "stderr"), f"stderr {tag}"))
        if p.io.stdin is not None:
            # not a relay to wait for: stdin may stay open after the exit
            p.stdin_task = self._spawn(self._relay_in(p), f"stdin {tag}")

    async def _relay_out(self, p: _Proc, which: str) -> None:
        agent = self._agent()
        read = agent.read_stdout if which == "stdout" else agent.read_stderr
        sink = p.io.stdout if which == "stdout" else p.io.stderr
        assert sink is not None
        broken = False
        while True:
            out = await read(p.container_id, p.exec_id)
            if out.eof:
                return
            if broken:
                continue  # keep draining: a stream nobody reads must not block the process
            try:
                await sink.write(out.data)
            except OSError as exc:  # EPIPE: a binary:// logger died; ENOSPC/EIO: a file:// sink
                broken = True
                log.warning(
                    f"cannot write the process's {which}; discarding the rest of it",
                    container_id=p.container_id,
                    exec_id=p.exec_id or None,
                    error=str(exc),
                )

    async def _relay_in(self, p: _Proc) -> None:
        agent = self._agent()
        src = p.io.stdin
        assert src is not None
        try:
            while p.exit is None:
                data = await src.read()
                if not data:
                    break
                await agent.write_stdin(p.container_id, p.exec_id, data)
            if p.exit is None:
                await agent.close_stdin(p.container_id, p.exec_id)
        except (NotFound, FailedPrecondition) as exc:
            log.debug("stdin relay ended", container_id=p.container_id, error=str(exc))

    # -- lookups --------------------------------------------------------------------------------------

    def _container(self, container_id: str) -> _Container:
        c = self._containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id} not found in sandbox {self.sandbox_id}")
        return c

    def _proc(self, container_id: str, exec_id: str) -> tuple[_Container, _Proc]:
        c = self._container(container_id)
        p = c.procs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} of task {container_id} not found")
        return c, p


def _check_guest_files(cfg: Config) -> None:
    """:raises FailedPrecondition: a guest image file the configuration names is missing."""
    hv = cfg.hypervisor
    missing = [str(p) for p in (hv.kernel, hv.initrd, hv.image) if p is not None and not p.exists()]
    if missing:
        raise FailedPrecondition(
            f"the guest image is missing ({', '.join(missing)}): {GUEST_BUILD_HINT}", missing=missing
        )


def _agent_stdio(stdio: Stdio, io: HostIO) -> AgentStdio:
    return AgentStdio(stdin=io.stdin is not None, stdout=io.stdout is not None, stderr=io.stderr is not None)


def _read_spec(bundle: str) -> dict[str, Any]:
    path = Path(bundle) / "config.json"
    try:
        spec = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidArgument(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path} is not a JSON object")
    return spec


def _memory_limit(resources: Mapping[str, Any]) -> int | None:
    memory = resources.get("memory") if isinstance(resources, Mapping) else None
    if not isinstance(memory, Mapping):
        return None
    limit = memory.get("limit")
    return int(limit) if isinstance(limit, int) else None


__all__ = ["VM_DIED_STATUS", "BootTimes", "VmSandbox"]
