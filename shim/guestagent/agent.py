"""The agent's domain: containers run by crun, their processes, OOM watching, the sandbox share.

``Agent`` owns every container and process (a dict on the event loop thread; per-container locks
serialize lifecycle commands). Handlers in ``service`` translate protobuf to calls here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
from shim.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    InvalidState,
    NotFound,
)
from shim.guestagent import guest, kernel, network
from shim.guestagent.cgroups import ContainerCgroup, Stats
from shim.guestagent.crun import Crun
from shim.guestagent.process import EXIT_IO_GRACE, Process, WaitResult, signal_number
from shim.guestagent.reaper import Reaper
from shim.guestagent.stdio import ConsoleSocket, OutputStream, StdinWriter
from shim.ids import validate_id
from shim.log import get_logger

log = get_logger(__name__)

OOM_POLL_INTERVAL = 0.5
MAX_OOM_QUEUE = 1024
MAX_FINISHED_EXECS = 256
DEFAULT_SHARE_DIR = "/run/pyvm/shared"
#: how long CreateSandbox waits for an unknown virtio-fs tag (or a NIC: ``network.configure``) to
#: appear, and how often it retries the mount
SHARE_WAIT = 20.0
SHARE_POLL = 0.025
#: what a virtio-fs mount fails with while the kernel does not know the tag: fs/fuse/virtio_fs.c
#: virtio_fs_get_tree logs "virtio-fs: tag <x> not found" and returns EINVAL. A device hot-plugged
#: right before CreateSandbox (a VM restored from a template) is probed a few ms later.
TAG_NOT_FOUND = frozenset({errno.EINVAL})
#: how long PrepareTemplate waits for pyvm-init's background module loader to exit
LOADER_WAIT = 120.0


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class StdioRequest:
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class Config:
    containers_root: Path = Path("/run/pyvm/containers")
    crun_root: str = "/run/crun"
    crun_binary: str = "crun"
    #: every container's cgroup is <parent>/<id>; the host's cgroupsPath means nothing here
    cgroup_parent: str = "/pyvm"
    exit_io_grace: float = EXIT_IO_GRACE
    oom_poll_interval: float = OOM_POLL_INTERVAL
    #: the agent owns this kernel (PID 1 of a pyvm guest): it sets the wall clock, seeds the RNG
    #: and drops caches when asked. False (a test on a host): it validates such requests and logs
    #: them, and leaves the kernel alone.
    guest_kernel: bool = False
    share_wait: float = SHARE_WAIT
    #: pid of pyvm-init's background module loader (PYVM_MODULES_LOADER_PID), if there is one
    modules_loader_pid: int | None = None


@dataclass(frozen=True)
class TemplateReport:
    """What PrepareTemplate did: modules listed / loaded by this call, failures, caches dropped."""

    modules_listed: int
    modules_loaded: int
    failures: tuple[str, ...]
    caches_dropped: bool


@dataclass
class Container:
    id: str
    bundle: Path
    state: State = State.CREATED
    init: Process | None = None
    execs: dict[str, Process] = field(default_factory=dict)
    cgroup: ContainerCgroup | None = None
    oom_seen: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def crun_log(self) -> Path:
        return self.bundle / "crun.log"

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            if self.init is None:
                raise NotFound(f"container {self.id} has no init process yet")
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id} not found in container {self.id}", exec_id=exec_id) from None

    def require(self, what: str, *states: State) -> None:
        if self.state not in states:
            raise InvalidState(f"container {self.id}", self.state, list(states))


class Agent:
    def __init__(self, reaper: Reaper, config: Config | None = None) -> None:
        self.reaper = reaper
        self.config = config or Config()
        self.crun = Crun(reaper, binary=self.config.crun_binary, root=self.config.crun_root)
        self.containers: dict[str, Container] = {}
        self._oom_queue: asyncio.Queue[str] = asyncio.Queue(MAX_OOM_QUEUE)
        self._oom_task: asyncio.Task[None] | None = None
        self._crun_version: str | None = None
        self.share_mount: str | None = None
        self._modules_ready = False
        self._loader_pid = self.config.modules_loader_pid

    # -- lifecycle of the agent itself ------------------------------------------------------------

    def start(self) -> None:
        self._oom_task = asyncio.create_task(self._watch_oom(), name="oom-watch")

    async def close(self) -> None:
        if self._oom_task is not None:
            self._oom_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._oom_task

    async def crun_version(self) -> str:
        if self._crun_version is None:
            self._crun_version = await self.crun.version()
        return self._crun_version

    async def ensure_modules(self) -> None:
        """Every module of the image loaded (virtiofs, virtio_mem...: pyvm-init defers them)."""
        if self._modules_ready:
            return
        failures = await asyncio.to_thread(guest.load_modules)
        if failures:
            log.warning("kernel modules not loaded", failures=failures)
        self._modules_ready = True

    async def prepare_template(self, drop_caches: bool = False) -> TemplateReport:
        """Settle the guest before the host saves it as a template: every listed module loaded
        (and pyvm-init's background loader gone), pyroute2 imported, filesystems synced, the page cache dropped only
        when asked (a warm cache is what makes a restored guest answer at once).
        Idempotent. Module failures are reported, not raised. Raises ``FailedPrecondition`` once
        the share is mounted or a container exists (a template holds neither).
        """
        if self.share_mount is not None or self.containers:
            raise FailedPrecondition(
                "a template VM has no share and no containers: PrepareTemplate comes before CreateSandbox",
                share_mount=self.share_mount,
                containers=len(self.containers),
            )
        start = time.monotonic()
        mods = await asyncio.to_thread(guest.load_listed_modules)
        failures = list(mods.failures)
        if self._loader_pid is not None:
            pid = self._loader_pid
            try:
                async with asyncio.timeout(LOADER_WAIT):
                    # shielded: the reaper's future must survive our timeout to record the exit
                    await asyncio.shield(self.reaper.adopt(pid))
                self._loader_pid = None
            except TimeoutError:
                failures.append(f"module loader (pid {pid}) still running after {LOADER_WAIT:g} s")
        self._modules_ready = True
        await network.preload()  # what a pod's network needs, already imported in every restore
        dropped = drop_caches and self.config.guest_kernel
        if dropped:
            await asyncio.to_thread(kernel.drop_caches)
        else:
            await asyncio.to_thread(os.sync)
        log.info(
            "template prepared",
            modules_listed=mods.listed,
            modules_loaded=mods.loaded,
            failures=failures,
            caches_dropped=dropped,
            ms=round((time.monotonic() - start) * 1000, 1),
        )
        return TemplateReport(mods.listed, mods.loaded, tuple(failures), dropped)

    # -- sandbox ------------------------------------------------------------------------------------

    async def create_sandbox(
        self,
        hostname: str,
        share_tag: str,
        share_mount_point: str,
        *,
        host_time_ns: int | None = None,
        entropy: bytes = b"",
        interfaces: Sequence[pb.Interface] = (),
        routes: Sequence[pb.Route] = (),
    ) -> None:
        """Set the wall clock to ``host_time_ns`` (when given), seed the RNG with ``entropy``, set
        the hostname, mount the virtio-fs share (waiting up to ``Config.share_wait`` for a tag the
        kernel does not know yet), then configure the pod's network: each of ``interfaces`` on the
        NIC with its MAC (waiting as long for a NIC not probed yet), then ``routes`` (see
        ``network.configure``). Everything is validated before anything changes. Not the guest
        kernel (a test on a host): the network is validated and logged, and left alone.

        Raises ``InvalidArgument`` for a bad hostname, mount point, time, too much entropy or a
        malformed interface or route, ``FailedPrecondition`` if the kernel refuses the clock, the
        RNG, the hostname, the mount or a network change, or a NIC never appears.
        """
        if hostname and (len(hostname) > 64 or not all(c.isalnum() or c in "-." for c in hostname)):
            raise InvalidArgument(f"invalid hostname {hostname!r}")
        target = share_mount_point or DEFAULT_SHARE_DIR
        if share_tag and (not os.path.isabs(target) or ".." in Path(target).parts):
            raise InvalidArgument(f"share mount point {target!r} must be an absolute path")
        if len(entropy) > kernel.MAX_ENTROPY:
            raise InvalidArgument(
                f"entropy is {len(entropy)} bytes; at most {kernel.MAX_ENTROPY}", size=len(entropy)
            )
        if host_time_ns is not None and host_time_ns <= 0:
            raise InvalidArgument(f"host time {host_time_ns} ns is not after the epoch")
        net = network.parse(interfaces, routes)
        await self._seed_kernel(host_time_ns, entropy)
        if hostname:
            try:
                socket.sethostname(hostname)
            except OSError as exc:
                raise FailedPrecondition(f"cannot set hostname: {exc}") from exc
        if share_tag:
            await self.ensure_modules()
            waited = await mount_share(share_tag, target, wait=self.config.share_wait)
            self.share_mount = target
            if waited:
                log.info(
                    "share mounted after waiting for its tag",
                    tag=share_tag,
                    target=target,
                    waited_ms=round(waited * 1000, 1),
                )
            else:
                log.info("share mounted", tag=share_tag, target=target)
        if net.interfaces:
            await self._configure_network(net)

    async def _configure_network(self, net: network.Network) -> None:
        if not self.config.guest_kernel:
            log.info(
                "not the guest kernel: network left alone",
                interfaces=[i.describe() for i in net.interfaces],
                routes=[r.describe() for r in net.routes],
            )
            return
        await self.ensure_modules()  # virtio_net
        start = time.monotonic()
        done = await network.configure(net, wait=self.config.share_wait)
        log.info(
            "network configured",
            interfaces=list(done.interfaces),
            routes=list(done.routes),
            waited_ms=round(done.waited * 1000, 1),
            ms=round((time.monotonic() - start) * 1000, 1),
        )

    async def _seed_kernel(self, host_time_ns: int | None, entropy: bytes) -> None:
        """The wall clock first (later log lines carry the right time), then the RNG."""
        if not self.config.guest_kernel:
            if host_time_ns is not None or entropy:
                log.debug("not the guest kernel: clock and RNG left alone", entropy_bytes=len(entropy))
            return
        if host_time_ns is not None:
            try:
                jump = await asyncio.to_thread(kernel.set_realtime, host_time_ns)
            except OSError as exc:
                raise FailedPrecondition(f"cannot set the clock: {exc.strerror}", errno=exc.errno) from exc
            log.info("clock set to the host's", jump_s=round(jump, 3))
        if entropy:
            try:
                reseeded = await asyncio.to_thread(kernel.add_entropy, entropy)
            except OSError as exc:
                raise FailedPrecondition(
                    f"cannot add entropy to the kernel RNG: {exc.strerror}", errno=exc.errno
                ) from exc
            log.info("kernel RNG seeded by the host", bytes=len(entropy), crng_reseeded=reseeded)

    async def destroy_sandbox(self) -> None:
        for cid in list(self.containers):
            with contextlib.suppress(NotFound):
                await self.remove_container(cid)
        if self.share_mount is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_umount, self.share_mount)
            self.share_mount = None
        os.sync()

    # -- containers ---------------------------------------------------------------------------------

    def get(self, container_id: str) -> Container:
        validate_id(container_id, kind="container id")
        try:
            return self.containers[container_id]
        except KeyError:
            raise NotFound(f"container {container_id} not found", container_id=container_id) from None

    async def create_container(self, container_id: str, spec_json: bytes, stdio: StdioRequest) -> int:
        """Write the bundle and ``crun create`` it; return the init pid.

        Raises ``InvalidArgument`` (bad id or spec), ``AlreadyExists``, ``FailedPrecondition``
        (crun failed; its message is included). Leaves nothing behind on failure.
        """
        validate_id(container_id, kind="container id")
        spec = _parse_json_object(spec_json, "OCI spec")
        _validate_spec(spec)
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id} already exists", container_id=container_id)
        linux = spec.setdefault("linux", {})
        if not isinstance(linux, dict):
            raise InvalidArgument("OCI spec: linux must be an object")
        linux["cgroupsPath"] = f"{self.config.cgroup_parent.rstrip('/')}/{container_id}"
        bundle = self.config.containers_root / container_id
        c = Container(container_id, bundle)
        self.containers[container_id] = c
        try:
            async with c.lock:
                if bundle.exists():
                    shutil.rmtree(bundle)
                bundle.mkdir(parents=True, mode=0o700)
                (bundle / "config.json").write_text(json.dumps(spec))
                terminal = bool(spec["process"].get("terminal", False))
                c.init = await self._spawn(
                    c,
                    "",
                    terminal,
                    stdio,
                    lambda io, sock: self.crun.create(
                        container_id, bundle, bundle / "init.pid", c.crun_log, stdio=io, console_socket=sock
                    ),
                    bundle / "init.pid",
                )
                c.cgroup = ContainerCgroup.of_pid(c.init.pid)
                if c.cgroup is None:
                    log.warning("container cgroup not found", container_id=container_id)
                else:
                    c.oom_seen = c.cgroup.oom_kills()
        except BaseException:
            self.containers.pop(container_id, None)
            await self._cleanup(c)
            raise
        log.info("container created", container_id=container_id, pid=c.init.pid)
        return c.init.pid

    async def start_container(self, container_id: str) -> int:
        c = self.get(container_id)
        async with c.lock:
            c.require("start", State.CREATED)
            await self.crun.start(container_id, c.crun_log)
            assert c.init is not None
            if c.state is State.CREATED:  # the init may have exited already
                c.state = State.RUNNING
            return c.init.pid

    async def exec_process(
        self, container_id: str, exec_id: str, process_json: bytes, stdio: StdioRequest
    ) -> int:
        c = self.get(container_id)
        validate_id(exec_id, kind="exec id")
        proc = _parse_json_object(process_json, "OCI process")
        _validate_process(proc, "OCI process")
        async with c.lock:
            c.require("exec in", State.RUNNING)
            if exec_id in c.execs:
                raise AlreadyExists(f"exec {exec_id} already exists in container {container_id}")
            self._forget_finished_execs(c)
            d = c.bundle / "execs" / exec_id
            d.mkdir(parents=True, mode=0o700)
            try:
                (d / "process.json").write_text(json.dumps(proc))
                terminal = bool(proc.get("terminal", False))
                p = await self._spawn(
                    c,
                    exec_id,
                    terminal,
                    stdio,
                    lambda io, sock: self.crun.exec(
                        container_id, d / "process.json", d / "pid", c.crun_log, stdio=io, console_socket=sock
                    ),
                    d / "pid",
                )
            finally:
                shutil.rmtree(d, ignore_errors=True)
            c.execs[exec_id] = p
            return p.pid

    async def signal(self, container_id: str, exec_id: str, sig: int, all_processes: bool) -> None:
        c = self.get(container_id)
        try:
            signal_number(sig)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        if all_processes:
            if exec_id:
                raise InvalidArgument("signal to all processes needs an empty exec id")
            if c.state is State.STOPPED:
                raise NotFound("process already finished", container_id=container_id)
            await self.crun.kill(container_id, sig, c.crun_log, all_processes=True)
            return
        c.process(exec_id).signal(sig)

    async def wait(self, container_id: str, exec_id: str) -> WaitResult:
        return await self.get(container_id).process(exec_id).wait()

    async def read_output(
        self, container_id: str, exec_id: str, which: str, max_bytes: int
    ) -> tuple[bytes, bool]:
        p = self.get(container_id).process(exec_id)
        stream = p.stdout if which == "stdout" else p.stderr
        return await stream.read(max_bytes)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        return await self.get(container_id).process(exec_id).stdin.write(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self.get(container_id).process(exec_id).stdin.close()

    def resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        self.get(container_id).process(exec_id).resize(rows, columns)

    async def pause(self, container_id: str) -> None:
        c = self.get(container_id)
        async with c.lock:
            c.require("pause", State.RUNNING)
            await self.crun.simple(["pause"], container_id, c.crun_log)
            c.state = State.PAUSED

    async def resume(self, container_id: str) -> None:
        c = self.get(container_id)
        async with c.lock:
            c.require("resume", State.PAUSED)
            await self.crun.simple(["resume"], container_id, c.crun_log)
            c.state = State.RUNNING

    async def update(self, container_id: str, resources_json: bytes) -> None:
        c = self.get(container_id)
        resources = _parse_json_object(resources_json, "LinuxResources")
        async with c.lock:
            c.require("update", State.CREATED, State.RUNNING, State.PAUSED)
            f = c.bundle / "resources.json"
            f.write_text(json.dumps(resources))
            await self.crun.update(container_id, f, c.crun_log)

    def stats(self, container_id: str) -> Stats:
        c = self.get(container_id)
        if c.cgroup is None:
            raise FailedPrecondition(f"container {container_id} has no cgroup to read")
        return c.cgroup.stats()

    def list_processes(self, container_id: str) -> list[tuple[int, str, bool]]:
        c = self.get(container_id)
        by_pid = {p.pid: eid for eid, p in c.execs.items() if not p.exited}
        init_pid = c.init.pid if c.init is not None and not c.init.exited else -1
        pids = c.cgroup.pids() if c.cgroup is not None else []
        return [(pid, by_pid.get(pid, ""), pid == init_pid) for pid in pids]

    async def remove_container(self, container_id: str) -> None:
        """``crun delete --force`` (kills what still runs), then drop every fd and file."""
        c = self.get(container_id)
        async with c.lock:
            if self.crun.state_dir(container_id).exists():
                await self.crun.simple(["delete", "--force"], container_id, c.crun_log)
            self.containers.pop(container_id, None)
            await self._cleanup(c)
        log.info("container removed", container_id=container_id)

    async def next_oom(self) -> str:
        return await self._oom_queue.get()

    # -- internals ----------------------------------------------------------------------------------

    async def _spawn(
        self, c: Container, exec_id: str, terminal: bool, stdio: StdioRequest, run_crun: Any, pid_file: Path
    ) -> Process:
        """Set up stdio (pipes or a console socket), run crun, adopt the pid it wrote."""
        parent_fds: list[int] = []
        child_fds: list[int | None] = [None, None, None]
        console: ConsoleSocket | None = None
        stdin_fd = out_fd = err_fd = None
        master: int | None = None
        try:
            if terminal:
                sock_path = c.bundle / f"console-{exec_id or 'init'}.sock"
                console = ConsoleSocket(sock_path)
                recv = asyncio.create_task(console.receive_master())
                try:
                    await run_crun((None, None, None), sock_path)
                    master = await recv
                finally:
                    recv.cancel()
                out_fd = os.dup(master)
                parent_fds += [master, out_fd]
            else:
                if stdio.stdin:
                    r, stdin_fd = os.pipe()
                    parent_fds.append(stdin_fd)
                    child_fds[0] = r
                if stdio.stdout:
                    out_fd, w = os.pipe()
                    parent_fds.append(out_fd)
                    child_fds[1] = w
                if stdio.stderr:
                    err_fd, w = os.pipe()
                    parent_fds.append(err_fd)
                    child_fds[2] = w
                try:
                    await run_crun(tuple(child_fds), None)
                finally:
                    for fd in child_fds:
                        if fd is not None:
                            os.close(fd)
            pid = _read_pid(pid_file)
        except BaseException:
            for fd in parent_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        finally:
            if console is not None:
                console.close()
        exit_future = self.reaper.adopt(pid)
        p = Process(
            c.id,
            exec_id,
            stdin=StdinWriter(master if terminal else stdin_fd, is_pty=terminal),
            stdout=OutputStream(out_fd, "stdout"),
            stderr=OutputStream(err_fd, "stderr"),
            pty_master=master,
        )
        p.watch(pid, exit_future, self._on_exit, self.config.exit_io_grace)
        return p

    def _on_exit(self, p: Process) -> bool:
        """A process exited and its output is read: record it; report whether OOM hit."""
        c = self.containers.get(p.container_id)
        if c is None:
            return False
        if not p.exec_id:
            c.state = State.STOPPED
        self._check_oom(c)
        log.info("process exited", container_id=c.id, exec_id=p.exec_id, pid=p.pid)
        return c.oom_seen > 0

    def _check_oom(self, c: Container) -> bool:
        """Queue an OOM event if the cgroup's oom_kill count grew; True if it did."""
        if c.cgroup is None:
            return False
        n = c.cgroup.oom_kills()
        if n <= c.oom_seen:
            return False
        c.oom_seen = n
        if self._oom_queue.full():
            self._oom_queue.get_nowait()
        self._oom_queue.put_nowait(c.id)
        log.warning("container saw an OOM kill", container_id=c.id, oom_kills=n)
        return True

    async def _watch_oom(self) -> None:
        while True:
            await asyncio.sleep(self.config.oom_poll_interval)
            for c in list(self.containers.values()):
                if c.state is not State.STOPPED:
                    self._check_oom(c)

    def _forget_finished_execs(self, c: Container) -> None:
        finished = [eid for eid, p in c.execs.items() if p.drained]
        for eid in finished[: max(0, len(finished) - MAX_FINISHED_EXECS)]:
            c.execs.pop(eid).close()

    async def _cleanup(self, c: Container) -> None:
        for p in [*c.execs.values(), *([c.init] if c.init else [])]:
            p.close()
        shutil.rmtree(c.bundle, ignore_errors=True)


def _read_pid(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise FailedPrecondition(f"crun wrote no pid file {path}: {exc}") from exc
    if not text.isdigit() or int(text) <= 0:
        raise FailedPrecondition(f"crun wrote a bad pid file {path}: {text[:40]!r}")
    return int(text)


def _parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _validate_process(proc: Any, what: str) -> None:
    if not isinstance(proc, dict):
        raise InvalidArgument(f"{what} must be an object")
    args = proc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"{what}: args must be a non-empty list of strings")
    if "cwd" in proc and not (isinstance(proc["cwd"], str) and proc["cwd"].startswith("/")):
        raise InvalidArgument(f"{what}: cwd must be an absolute path")
    if "env" in proc and not (isinstance(proc["env"], list) and all(isinstance(e, str) for e in proc["env"])):
        raise InvalidArgument(f"{what}: env must be a list of strings")
    if "terminal" in proc and not isinstance(proc["terminal"], bool):
        raise InvalidArgument(f"{what}: terminal must be a boolean")


def _validate_spec(spec: dict[str, Any]) -> None:
    _validate_process(spec.get("process"), "OCI spec process")
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise InvalidArgument("OCI spec: root.path must be a non-empty string")
    if not os.path.isabs(root["path"]):
        raise InvalidArgument("OCI spec: root.path must be absolute (rewritten to the share by the host)")
    if not os.path.isdir(root["path"]):
        raise InvalidArgument(f"OCI spec: root.path {root['path']} is not a directory in the guest")
    mounts = spec.get("mounts", [])
    if not isinstance(mounts, list) or not all(isinstance(m, dict) for m in mounts):
        raise InvalidArgument("OCI spec: mounts must be a list of objects")


_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _mount_virtiofs(tag: str, target: str) -> None:
    """Mount ``tag`` on ``target`` unless something is mounted there already. Raises ``OSError``."""
    if not os.path.ismount(target):
        os.makedirs(target, exist_ok=True)
        _mount(tag, target, "virtiofs", 0, "")


async def mount_share(
    tag: str,
    target: str,
    *,
    wait: float = SHARE_WAIT,
    poll: float = SHARE_POLL,
    mount: Callable[[str, str], None] = _mount_virtiofs,
) -> float:
    """Mount the virtio-fs ``tag`` on ``target``, retrying every ``poll`` seconds for up to ``wait``
    seconds while the kernel does not know the tag (``TAG_NOT_FOUND``). Returns how long it waited
    (0.0: the first attempt worked).

    Raises ``FailedPrecondition`` naming the tag and the errno: at once for any other error, after
    ``wait`` for a tag that never appeared.
    """
    start = time.monotonic()
    retries = 0
    while True:
        try:
            await asyncio.to_thread(mount, tag, target)
        except OSError as exc:
            if exc.errno not in TAG_NOT_FOUND:
                raise FailedPrecondition(
                    f"cannot mount virtiofs {tag} on {target}: {exc.strerror}", tag=tag, errno=exc.errno
                ) from exc
            waited = time.monotonic() - start
            if waited >= wait:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                raise FailedPrecondition(
                    f"virtio-fs tag {tag!r} is not in the guest after {waited:.1f} s "
                    f"(mount on {target}: {name}, {exc.strerror})",
                    tag=tag,
                    errno=exc.errno,
                    waited=waited,
                ) from exc
            retries += 1
            await asyncio.sleep(poll)
        else:
            return time.monotonic() - start if retries else 0.0


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


__all__ = ["Agent", "Config", "Container", "State", "StdioRequest", "TemplateReport", "mount_share"]
