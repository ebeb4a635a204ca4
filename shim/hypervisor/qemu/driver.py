"""One sandbox VM: virtiofsd + QEMU + QMP + the memory mechanism, behind a small API.

Usage (the sandbox layer)::

    verdict = accel.resolve(cfg.hypervisor.accelerator, await accel.get_verdict(accel.target_for(cfg.hypervisor)))
    vm = QemuVM(cfg, SandboxDir.for_sandbox(sid), verdict, on_exit=callback)
    await vm.start()          # raises InvalidArgument / FailedPrecondition before anything is spawned,
                              # VMLaunchFailure (exit code, argv, QEMU log + console tails) if QEMU dies,
                              # DeadlineExceeded if QMP does not come up in time
    vm.pid                    # QEMU's pid;  vm.agent_socket_path: connect the agent client here
                              # (QEMU listens; the guest agent owns virtio-serial port AGENT_PORT_NAME)
    vm.timeouts               # config timeouts x the accelerator's speed factor: use them for agent waits
    vm.accel                  # AccelVerdict (accel, reason, speed_factor, degraded -> metrics label)
    state = await vm.resize_memory(target_bytes)      # MemoryState: what QEMU reports afterwards
    info = await vm.exited    # ExitInfo, resolves whenever QEMU ends (stop() or death)
    await vm.stop()           # idempotent; after it: no QEMU, no virtiofsd, no socket, no efivars copy

Unexpected death: a watcher task awaits QEMU's exit (kernel notification, ms latency). If QEMU dies
while not being stopped, the VM cleans up (virtiofsd, sockets, files), resolves ``exited`` with
``unexpected=True`` and calls ``on_exit(info)``. Every later call raises ``Unavailable``.

Files: everything lives in ``SandboxDir``; ``console.log``, ``qemu.log``, ``virtiofsd.log`` and
``guest.log`` (the agent's log port) are kept after stop for post-mortems (the sandbox layer removes
the directory); sockets, pid files and the efivars copy are removed. After a failure (QEMU did not
come up, died, or the guest never answered) ``keep_logs()`` copies those logs to
``sdir.postmortem``, outside the sandbox directory, so they outlive the shim (the newest
``paths.POSTMORTEM_KEEP`` sandboxes' copies are kept, older ones deleted); the launch error
and the death report name that copy. The share directory is created if missing and removed if we created it and
it is empty at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import config as config_mod
from shim import paths
from shim.config import Config, Timeouts
from shim.errors import FailedPrecondition, InvalidArgument, InvalidState, ShimError, Unavailable
from shim.hypervisor.qemu.cmdline import HOTPLUG_PORT, NIC_HOTPLUG_PORT, Boot, TapNic, VirtioFs, vm_command
from shim.hypervisor.qemu.memory import DimmMemory, MemoryMechanism, MemoryState, NoHotplug, VirtioMemMemory
from shim.hypervisor.qemu.process import Child, describe_status, launch_failure, spawn, tail, wait_for_path
from shim.hypervisor.qemu.qmp import Qmp
from shim.hypervisor.qemu.template import Template, load_ram, new_ram_fd, save_ram
from shim.log import get_logger
from shim.paths import SandboxDir
from shim.platform.accel import AccelVerdict
from shim.platform.host import check_file

log = get_logger("pyvm.hypervisor.qemu")


class VMState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None
    description: str  # "exit code 0", "killed by SIGKILL"
    unexpected: bool
    console_tail: str = ""
    qemu_log_tail: str = ""
    at: float = 0.0


#: biggest part of each log file kept after a failure (the end of it)
POSTMORTEM_MAX_BYTES = 1 << 20


def prune_postmortems(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recently written sandbox directories under ``root`` (a
    post-mortem root). Returns what was deleted; errors are logged, never raised."""
    try:
        entries = [(e.stat().st_mtime, e) for e in root.iterdir() if e.is_dir() and not e.is_symlink()]
    except OSError:
        return []
    entries.sort(key=lambda t: t[0], reverse=True)
    removed = []
    for _, old in entries[keep:]:
        try:
            shutil.rmtree(old)
            removed.append(old)
        except OSError as exc:
            log.warning("cannot remove an old post-mortem", path=str(old), error=str(exc))
    return removed


def keep_logs(sdir: SandboxDir, keep: int | None = None) -> Path | None:
    """Copy the VM's logs (the last ``POSTMORTEM_MAX_BYTES`` of each) to ``sdir.postmortem``, then
    delete the oldest sandboxes' post-mortems beyond ``keep`` (default ``paths.POSTMORTEM_KEEP``), so
    a node that keeps failing does not fill its tmpfs.

    Returns the directory, or ``None`` when there was nothing to keep or it could not be written
    (logged: a post-mortem must never hide the original error).
    """
    dest = sdir.postmortem
    kept = 0
    try:
        for src in (sdir.console_log, sdir.qemu_log, sdir.virtiofsd_log, sdir.guest_log):
            try:
                with open(src, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - POSTMORTEM_MAX_BYTES))
                    data = f.read(POSTMORTEM_MAX_BYTES)
            except FileNotFoundError:
                continue
            dest.mkdir(mode=0o700, parents=True, exist_ok=True)
            (dest / src.name).write_bytes(data)
            kept += 1
    except OSError as exc:
        log.error("cannot keep the VM logs", sandbox_id=sdir.sandbox_id, dest=str(dest), error=str(exc))
        return None
    if not kept:
        return None
    with contextlib.suppress(OSError):
        os.utime(dest)  # newest: a second failure of the same id must not make it look old
    prune_postmortems(sdir.postmortem_root, paths.POSTMORTEM_KEEP if keep is None else keep)
    return dest


class QemuVM:
    """One VM. Methods are coroutines on one event loop; ``_lock`` serializes start/stop/resize."""

    def __init__(
        self,
        cfg: Config,
        sdir: SandboxDir,
        accel: AccelVerdict,
        *,
        on_exit: Callable[[ExitInfo], None] | None = None,
        console_socket: bool = False,
        extra_kernel_params: Sequence[str] = (),
        boot: Boot = Boot.COLD,
        template: Template | None = None,
        nics: Sequence[TapNic] = (),
    ) -> None:
        """``nics``: the pod's NICs; their tap fds stay the caller's (QEMU inherits copies; close
        them once :meth:`start` returned). A restored VM takes one at most (one hot-plug port)."""
        if (boot is Boot.RESTORE) != (template is not None):
            raise InvalidArgument("a restored VM needs its template, and only a restored VM takes one")
        if boot is Boot.TEMPLATE and nics:
            raise InvalidArgument("a template VM has no NIC: it belongs to no pod")
        if boot is Boot.RESTORE and len(nics) > 1:
            raise InvalidArgument(
                f"a restored VM has one hot-plug port for NICs; the pod has {len(nics)} (boot it cold)",
                nics=len(nics),
            )
        self.cfg = cfg
        self.sdir = sdir
        self.accel = accel
        self.timeouts: Timeouts = cfg.timeouts.scaled(accel.speed_factor)
        self.on_exit = on_exit
        self.console_socket_path: Path | None = sdir.console_sock if console_socket else None
        self.extra_kernel_params = tuple(extra_kernel_params)
        self.state = VMState.NEW
        self.qemu: Child | None = None
        self.virtiofsd: Child | None = None
        self.qmp: Qmp | None = None
        self.memory: MemoryMechanism | None = None
        self._exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._created_share = False
        self.boot_started = 0.0
        self.boot = boot
        self.template = template
        self.nics = tuple(nics)
        #: the memfd of boot RAM for TEMPLATE/RESTORE boots (QEMU maps it as /proc/self/fd/N)
        self._ram_fd: int | None = None
        #: what a restore took, for logs and metrics: {"ram_bytes", "copy_s", "load_s", "hotplug_s"}
        self.restore_stats: dict[str, float] = {}

    # -- public API ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.qemu.pid if self.qemu else None

    @property
    def agent_socket_path(self) -> Path:
        return self.sdir.agent_sock

    @property
    def exited(self) -> asyncio.Future[ExitInfo]:
        return self._exited

    def argv(self) -> list[str]:
        ram_path = None
        if self.boot is not Boot.COLD:
            # before the memfd exists (preflight) a placeholder of the same shape
            ram_path = Path(f"/proc/self/fd/{self._ram_fd if self._ram_fd is not None else 3}")
        return vm_command(
            self.cfg,
            self.sdir,
            self.accel.accel,
            console_socket=self.console_socket_path,
            extra_kernel_params=self.extra_kernel_params,
            boot=self.boot,
            ram_path=ram_path,
            nics=self.nics,
        ).argv()

    def preflight(self) -> None:
        """Everything that can be refused before a process is spawned (no side effects).

        Raises InvalidArgument (bad configuration, e.g. arm64 acpi hotplug without pflashes) or
        FailedPrecondition (a file the configuration names is missing).
        """
        config_mod.validate(self.cfg)
        hv = self.cfg.hypervisor
        checks = [
            check_file("qemu", "hypervisor.path", hv.path),
            check_file("kernel", "hypervisor.kernel", hv.kernel),
        ]
        if hv.initrd is not None:
            checks.append(check_file("initrd", "hypervisor.initrd", hv.initrd))
        if hv.image is not None:
            checks.append(check_file("image", "hypervisor.image", hv.image))
        for i, p in enumerate(hv.pflashes):
            checks.append(check_file("firmware", f"hypervisor.pflashes[{i}]", p))
        if self.cfg.shared_fs.kind == "virtio-fs":
            checks.append(check_file("virtiofsd", "shared_fs.daemon", self.cfg.shared_fs.daemon))
        bad = [c.detail for c in checks if not c.ok]
        if bad:
            raise FailedPrecondition("cannot start the VM: " + "; ".join(bad), missing=bad)
        self.argv()  # the builders validate every part

    async def start(self) -> None:
        """Start virtiofsd and QEMU and connect QMP. On any failure everything started is stopped."""
        async with self._lock:
            if self.state is not VMState.NEW:
                raise InvalidState("VM", self.state, VMState.NEW)
            self.preflight()
            self.state = VMState.STARTING
            self.boot_started = time.monotonic()
            try:
                await self._start()
            except BaseException as exc:
                await self._teardown(graceful=False)
                self.state = VMState.STOPPED
                if isinstance(exc, ShimError):
                    kept = keep_logs(self.sdir)
                    if kept is not None:
                        exc.message += f" (VM logs kept in {kept})"
                        exc.facts["logs"] = str(kept)
                raise
            self.state = VMState.RUNNING

    async def resize_memory(self, target_bytes: int) -> MemoryState:
        """Grow or shrink the VM towards ``target_bytes`` (see :mod:`.memory` for the contract)."""
        self._require_running()
        assert self.memory is not None
        return await self.memory.resize(target_bytes)

    async def memory_state(self) -> MemoryState:
        self._require_running()
        assert self.memory is not None
        return await self.memory.refresh()

    def set_memory_block_size(self, block_bytes: int) -> None:
        """Tell the mechanism the guest's memory block size (``/sys/devices/system/memory/block_size_bytes``)."""
        if self.memory is not None:
            self.memory.block_bytes = block_bytes

    async def stop(self, *, graceful: bool = False) -> ExitInfo:
        """Stop the VM and clean up; idempotent. ``graceful``: ACPI power button first (guest shutdown).

        Order: [system_powerdown, wait timeouts.shutdown] → QMP quit (wait) → SIGTERM → SIGKILL, then
        virtiofsd the same way, then the files.
        """
        async with self._lock:
            if self.state in (VMState.NEW, VMState.STOPPED):
                self.state = VMState.STOPPED
                await self._teardown(graceful=False)
                if not self._exited.done():
                    self._exited.set_result(ExitInfo(None, "never started", False, at=time.time()))
                return self._exited.result()
            self.state = VMState.STOPPING
            await self._teardown(graceful=graceful)
            self.state = VMState.STOPPED
            return await self._exited

    # -- internals -------------------------------------------------------------------------------

    def _require_running(self) -> None:
        if self.state is not VMState.RUNNING:
            if self._exited.done() and self._exited.result().unexpected:
                raise Unavailable(f"the VM is gone: QEMU {self._exited.result().description}")
            raise InvalidState("VM", self.state, VMState.RUNNING)

    async def _start(self) -> None:
        sd = self.sdir
        sd.root.mkdir(parents=True, exist_ok=True)
        os.chmod(sd.root, 0o700)
        for stale in self._runtime_files():
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        hv = self.cfg.hypervisor
        if hv.firmware_vars is not None:
            shutil.copyfile(hv.firmware_vars, sd.efivars)
        if self.cfg.shared_fs.kind == "virtio-fs" and self.boot is not Boot.TEMPLATE:
            if not sd.share.exists():
                sd.share.mkdir(mode=0o700)
                self._created_share = True
            await self._start_virtiofsd()
        pass_fds = tuple(n.fd for n in self.nics)
        if self.boot is not Boot.COLD:
            self._ram_fd = new_ram_fd(hv.default_memory)
            pass_fds += (self._ram_fd,)
            if self.template is not None:
                t = time.monotonic()
                copied = await asyncio.to_thread(load_ram, self.template, self._ram_fd)
                self.restore_stats.update(ram_bytes=copied, copy_s=time.monotonic() - t)
        argv = self.argv()
        log.info(
            "starting QEMU", sandbox_id=sd.sandbox_id, accel=self.accel.accel, boot=self.boot.value, argv=argv
        )
        self.qemu = await spawn("qemu", argv, sd.qemu_log, pass_fds=pass_fds)
        sd.qemu_pid.write_text(f"{self.qemu.pid}\n")
        self._watch = asyncio.create_task(self._watch_exit(), name=f"vm-watch-{sd.sandbox_id}")
        await wait_for_path(sd.qmp_sock, self.qemu, self.timeouts.qmp, what="the QMP socket")
        self.qmp = await self._connect_qmp()
        try:
            status = await self.qmp.query_status()
        except ShimError as exc:
            if self.qemu.exited.done():
                raise launch_failure(
                    self.qemu,
                    f"QEMU {describe_status(self.qemu.returncode)} during startup",
                    console_log=sd.console_log,
                ) from exc
            raise
        log.info(
            "QEMU up",
            sandbox_id=sd.sandbox_id,
            pid=self.qemu.pid,
            status=status,
            ms=round((time.monotonic() - self.boot_started) * 1000),
        )
        if self.boot is Boot.RESTORE:
            await self._restore()
        mib = hv.default_memory, hv.max_memory
        t = self.timeouts.qmp
        if hv.memory_hotplug == "acpi":
            self.memory = DimmMemory(
                self.qmp, boot_mib=mib[0], max_mib=mib[1], slots=hv.memory_slots, timeout=t
            )
        elif hv.memory_hotplug == "virtio-mem":
            self.memory = VirtioMemMemory(self.qmp, boot_mib=mib[0], max_mib=mib[1], timeout=t)
        else:
            self.memory = NoHotplug(self.qmp, boot_mib=mib[0], max_mib=mib[0], timeout=t)

    async def _migration_done(self, what: str) -> dict[str, Any]:
        """Poll query-migrate until the migration (``what``: for errors) completes; QEMU dying or the
        migration failing raise VMLaunchFailure with QEMU's log."""
        assert self.qemu is not None and self.qmp is not None
        deadline = time.monotonic() + self.timeouts.boot
        while True:
            if self.qemu.exited.done():
                raise launch_failure(
                    self.qemu, f"QEMU {describe_status(self.qemu.returncode)} during {what}", console_log=None
                )
            info = await self.qmp.query_migrate()
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise launch_failure(
                    self.qemu,
                    f"{what} {status}: {info.get('error-desc', 'no reason given')}",
                    console_log=None,
                )
            if time.monotonic() > deadline:
                raise launch_failure(self.qemu, f"{what} not done within {self.timeouts.boot:g} s ({status})")
            await asyncio.sleep(0.005)

    async def _restore(self) -> None:
        """Load the template's device state (its RAM is already in our memfd), run the VM, hot-plug
        the virtio-fs device the template could not carry."""
        assert self.qmp is not None and self.template is not None
        t = time.monotonic()
        await self.qmp.set_migration_capabilities(x_ignore_shared=True)
        await self.qmp.execute(
            "migrate-incoming", {"uri": f"exec:cat -- {shlex.quote(str(self.template.state))}"}
        )
        await self._migration_done("the restore of the VM template")
        await self.qmp.execute("cont")
        self.restore_stats["load_s"] = time.monotonic() - t
        if self._ram_fd is not None:  # QEMU has its own reference since it started
            os.close(self._ram_fd)
            self._ram_fd = None
        if self.cfg.shared_fs.kind == "virtio-fs":
            t = time.monotonic()
            fs = VirtioFs(self.sdir.virtiofsd_sock)
            await self.qmp.execute("chardev-add", fs.qmp_chardev())
            await self.qmp.execute("device_add", fs.qmp_device(HOTPLUG_PORT.id))
            self.restore_stats["hotplug_s"] = time.monotonic() - t
        for nic in self.nics:
            t = time.monotonic()
            await self.qmp.execute("netdev_add", nic.qmp_netdev())
            await self.qmp.execute("device_add", nic.qmp_device(NIC_HOTPLUG_PORT.id))
            self.restore_stats["nic_hotplug_s"] = time.monotonic() - t
        log.info(
            "VM restored from its template",
            sandbox_id=self.sdir.sandbox_id,
            template=str(self.template.dir),
            **{k: round(v, 3) for k, v in self.restore_stats.items()},
        )

    async def save_template(self, dest: Path) -> dict[str, float]:
        """Pause this ``Boot.TEMPLATE`` VM and write its device state (``dest/state``) and guest RAM
        (``dest/ram``); the VM stays paused (stop it next). Returns sizes and seconds."""
        async with self._lock:
            self._require_running()
            if self.boot is not Boot.TEMPLATE or self._ram_fd is None:
                raise InvalidState("VM boot", self.boot.value, Boot.TEMPLATE.value)
            assert self.qmp is not None
            t = time.monotonic()
            await self.qmp.execute("stop")
            await self.qmp.set_migration_capabilities(x_ignore_shared=True)
            # QEMU's default cap is 32 MiB/s; this stream is local and small (device state only)
            await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            state = dest / "state"
            await self.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
            await self._migration_done("saving the VM template")
            t_state = time.monotonic() - t
            ram = await asyncio.to_thread(save_ram, self._ram_fd, dest / "ram")
            return {
                "state_bytes": state.stat().st_size,
                "ram_bytes": ram,
                "state_s": t_state,
                "total_s": time.monotonic() - t,
            }

    async def _connect_qmp(self) -> Qmp:
        """Connect to QMP, retrying while QEMU has bound but not yet listens on the socket."""
        assert self.qemu is not None
        sd = self.sdir
        deadline = time.monotonic() + self.timeouts.qmp
        while True:
            qmp = Qmp(f"pyvm-{sd.sandbox_id}", command_timeout=self.timeouts.qmp)
            connect = asyncio.create_task(qmp.connect(sd.qmp_sock, max(0.1, deadline - time.monotonic())))
            done, _ = await asyncio.wait({connect, self.qemu.exited}, return_when=asyncio.FIRST_COMPLETED)
            if connect not in done:
                connect.cancel()
                with contextlib.suppress(BaseException):
                    await connect
                raise launch_failure(
                    self.qemu,
                    f"QEMU {describe_status(self.qemu.returncode)} during startup",
                    console_log=sd.console_log,
                )
            try:
                connect.result()
                return qmp
            except Unavailable:
                await qmp.close()
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.02)

    async def _start_virtiofsd(self) -> None:
        fs, sd = self.cfg.shared_fs, self.sdir
        argv = [
            str(fs.daemon),
            f"--socket-path={sd.virtiofsd_sock}",
            "-o",
            f"source={sd.share}",
            "-o",
            f"cache={fs.cache}",
            "-o",
            "sandbox=namespace",
            *fs.extra_args,
        ]
        self.virtiofsd = await spawn("virtiofsd", argv, sd.virtiofsd_log)
        sd.virtiofsd_pid.write_text(f"{self.virtiofsd.pid}\n")
        await wait_for_path(sd.virtiofsd_sock, self.virtiofsd, self.timeouts.qmp, what="the virtiofsd socket")

    async def _watch_exit(self) -> None:
        assert self.qemu is not None
        rc = await self.qemu.exited
        was_running = self.state is VMState.RUNNING
        unexpected = self.state in (VMState.RUNNING, VMState.STARTING)
        info = ExitInfo(
            rc,
            describe_status(rc),
            unexpected,
            tail(self.sdir.console_log),
            tail(self.sdir.qemu_log),
            time.time(),
        )
        if was_running:
            log.error(
                "QEMU exited unexpectedly",
                sandbox_id=self.sdir.sandbox_id,
                status=info.description,
                qemu_log=info.qemu_log_tail[-2000:],
                logs_kept=str(keep_logs(self.sdir)),
            )
            self.state = VMState.STOPPING
            # clean up behind the dead QEMU without waiting for a caller
            await self._teardown(graceful=False, from_watcher=True)
            self.state = VMState.STOPPED
        if not self._exited.done():
            self._exited.set_result(info)
        if was_running and self.on_exit is not None:
            try:
                self.on_exit(info)
            except Exception as exc:
                log.error("on_exit callback failed", error=str(exc))

    async def _teardown(self, *, graceful: bool, from_watcher: bool = False) -> None:
        q = self.qemu
        if q is not None and q.returncode is None:
            if graceful and self.qmp is not None:
                with contextlib.suppress(ShimError):
                    await self.qmp.system_powerdown()
                    await q.wait(self.timeouts.shutdown)
            if q.returncode is None and self.qmp is not None:
                with contextlib.suppress(ShimError):
                    await self.qmp.quit()
                await q.wait(min(self.timeouts.qmp, 5.0))
            if q.returncode is None:
                await q.stop(term_grace=3.0)
        if q is not None:
            await asyncio.shield(q.exited)
        if self.qmp is not None:
            await self.qmp.close()
        if self.virtiofsd is not None:
            # the C virtiofsd exits by itself when QEMU disconnects; give it a moment first
            if await self.virtiofsd.wait(1.0) is None:
                await self.virtiofsd.stop(term_grace=2.0)
        if self._watch is not None and not from_watcher and not self._watch.done():
            await self._watch  # resolves `exited`
        if not self._exited.done() and q is not None and not from_watcher:
            rc = q.returncode
            self._exited.set_result(
                ExitInfo(
                    rc,
                    describe_status(rc),
                    False,
                    tail(self.sdir.console_log),
                    tail(self.sdir.qemu_log),
                    time.time(),
                )
            )
        for f in self._runtime_files():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        if self._ram_fd is not None:
            os.close(self._ram_fd)
            self._ram_fd = None
        if self._created_share:
            with contextlib.suppress(OSError):
                self.sdir.share.rmdir()

    def _runtime_files(self) -> list[Path]:
        sd = self.sdir
        files = [
            sd.qmp_sock,
            sd.agent_sock,
            sd.virtiofsd_sock,
            virtiofsd_pidfile(sd.virtiofsd_sock),
            sd.efivars,
            sd.qemu_pid,
            sd.virtiofsd_pid,
        ]
        if self.console_socket_path is not None:
            files.append(self.console_socket_path)
        return files


def virtiofsd_pidfile(socket: Path) -> Path:
    """Where QEMU 7.2's C virtiofsd locks its socket: /run/virtiofsd/<socket path, '/' -> '.'>.pid.

    It never removes that file itself.
    """
    return Path("/run/virtiofsd") / (str(socket).replace("/", ".") + ".pid")


def kill_leftovers(sdir: SandboxDir) -> None:
    """Best effort after a shim crash: SIGKILL the QEMU/virtiofsd whose pid files remain in ``sdir``."""
    for pidfile in (sdir.qemu_pid, sdir.virtiofsd_pid):
        try:
            pid = int(pidfile.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(sdir.root).encode() in cmd:  # the pid was not recycled for something else
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


__all__ = [
    "POSTMORTEM_MAX_BYTES",
    "ExitInfo",
    "QemuVM",
    "VMState",
    "keep_logs",
    "kill_leftovers",
    "prune_postmortems",
    "virtiofsd_pidfile",
]
