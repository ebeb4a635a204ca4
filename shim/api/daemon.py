"""The long-lived shim daemon that ``start`` spawns: one per sandbox (pod).

Serves the task API on the listening socket handed over as fd 3 (ttrpc) or on ``-socket`` (gRPC),
logs JSON to the bundle's ``log`` FIFO (dup'ed onto stderr, so containerd folds it into its log),
publishes events to ``$TTRPC_ADDRESS``, persists ``state.json`` for ``delete`` (and the CRI
annotations for ``pyvm monitor``), serves its metrics on ``metrics.sock`` (0600) in the sandbox
directory, and exits after
answering a ``Shutdown`` that leaves no task, or on SIGTERM/SIGINT. On exit it tears the sandbox
down and removes its sockets and state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import signal
import socket
import stat
import sys
from collections.abc import Mapping
from typing import Any

from shim import __version__, paths
from shim import log as shimlog
from shim.api import bootstrap, interceptors
from shim.api.events import EventPublisher
from shim.api.task_api import TaskAPI, ttrpc_server
from shim.metrics import ShimMetrics
from shim.metrics_server import MetricsServer, serve_metrics
from shim.sandbox import cleanup, persist
from shim.sandbox.backend import SandboxBackend
from shim.sandbox.pod import bundle_membership, read_annotations
from shim.sandbox.vm import VmSandbox
from shim.service.task_service import TaskService

log = shimlog.get_logger("shim.daemon")

_PR_SET_CHILD_SUBREAPER = 36
LISTEN_FD = 3


#: sandbox annotations kept in state.json (``pyvm monitor`` reads them for its ``cri_*`` labels)
CRI_SANDBOX_ANNOTATIONS = (
    "io.kubernetes.cri.sandbox-uid",
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.sandbox-namespace",
)


def load_backend(
    sandbox_id: str, namespace: str, sdir: paths.SandboxDir, metrics: ShimMetrics | None = None
) -> SandboxBackend:
    """The sandbox backend: ``VmSandbox`` (one VM for this pod). It refuses Create with
    FAILED_PRECONDITION naming the fix when the host cannot boot guests (e.g. no guest image).

    TEST SEAM: ``PYVM_TEST_BACKEND=module:factory`` (e.g. ``shim.testing.fake_backend:FakeBackend``)
    loads another backend, and only when ``PYVM_ENABLE_TEST_SEAMS=1`` is also set; otherwise the
    daemon refuses to start. It is loaded by name on purpose: production code never imports
    ``shim.testing``.
    """
    spec = bootstrap.check_test_seam()
    if spec is None:
        return VmSandbox(sandbox_id, namespace=namespace, sdir=sdir, metrics=metrics)
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr or "Backend")
    log.warning("using a TEST backend", backend=spec)
    backend: SandboxBackend = factory()
    return backend


def _redirect_stderr_to_log(bundle: str) -> None:
    """Point fd 2 at the bundle's ``log`` FIFO (containerd keeps it open O_RDWR, so opening the
    write end does not block); a regular file is appended to; no file leaves stderr as it is."""
    path = os.path.join(bundle, "log")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISFIFO(st.st_mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no reader: nobody would see the log anyway
        os.set_blocking(fd, True)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    os.dup2(fd, 2)
    os.close(fd)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become child subreaper", errno=ctypes.get_errno())


def serve(flags: bootstrap.Flags) -> int:
    """Run the daemon until it is told to exit; returns the process exit code."""
    bundle = os.getcwd()
    _redirect_stderr_to_log(bundle)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    shimlog.configure(level="debug" if flags.debug else "info", stream=sys.stderr)
    shimlog.bind_contextvars(namespace=flags.namespace, shim_id=flags.id, shim_pid=os.getpid())
    _become_subreaper()
    try:
        asyncio.run(_serve(flags, bundle))
    except Exception:
        log.exception("shim daemon failed")
        return 1
    return 0


async def _serve(flags: bootstrap.Flags, bundle: str) -> None:
    member = bundle_membership(flags.id, bundle)
    shimlog.bind_contextvars(sandbox_id=member.sandbox_id)  # every line of this daemon carries it
    sdir = paths.SandboxDir.for_sandbox(member.sandbox_id)
    proto = bootstrap.protocol()
    sock_path = flags.socket or bootstrap.socket_path(flags.address, flags.namespace, member.sandbox_id)
    metrics = ShimMetrics()
    interceptors.set_observer(metrics.observe_rpc)
    backend = load_backend(member.sandbox_id, flags.namespace, sdir, metrics)

    start_time = persist.process_start_time(os.getpid()) or 0
    record = persist.SandboxRecord(
        sandbox_id=member.sandbox_id,
        namespace=flags.namespace,
        address="unix://" + sock_path,
        bundle=bundle,
        shim_pid=os.getpid(),
        shim_start_time=start_time,
        annotations=_cri_annotations(bundle) if member.is_sandbox else {},
    )

    def on_containers_changed(containers: Mapping[str, str]) -> None:
        record.containers = {cid: {"bundle": b} for cid, b in containers.items()}
        persist.save(sdir, record)

    persist.claim(sdir, record)  # AlreadyExists: the id is live in another namespace; touch nothing
    metrics_server = await _serve_metrics(sdir, metrics)
    publisher = EventPublisher(
        address=os.environ.get("TTRPC_ADDRESS") or None,
        namespace=flags.namespace,
        on_result=metrics.event_published,
    )
    publisher.start()
    service = TaskService(
        backend,
        publisher,
        shim_pid=os.getpid(),
        version=__version__,
        on_containers_changed=on_containers_changed,
    )
    api = TaskAPI(service)
    server: Any
    if proto == "grpc":
        from shim.api.grpc_server import serve_grpc  # grpcio is heavy: only when asked for

        server = await serve_grpc(api, sock_path)
    else:
        server = ttrpc_server(api)
        if flags.socket:
            await server.serve_unix(path=sock_path)
            os.chmod(sock_path, 0o600)
        else:
            await server.serve_unix(sock=socket.socket(fileno=LISTEN_FD))
    log.info("shim serving", protocol=proto, address=record.address, sandbox_id=member.sandbox_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    shutdown = asyncio.create_task(service.shutdown_requested.wait())
    await asyncio.wait({stopper, shutdown}, return_when=asyncio.FIRST_COMPLETED)
    reason = "shutdown requested" if shutdown.done() else "signal"
    for t in (stopper, shutdown):
        t.cancel()
    log.info("shim exiting", reason=reason, remaining=service.container_ids)
    # The Shutdown answer is written by the handler's task right after it returns; give it a turn.
    await asyncio.sleep(0.05)
    if proto == "grpc":
        await server.stop(grace=0.5)
    else:
        await server.close()
    if metrics_server is not None:
        await metrics_server.close()  # removes metrics.sock: the monitor stops listing this sandbox
    await service.close()
    metrics.set_sandbox_source(None)
    await metrics.aclose()
    interceptors.set_observer(None)
    await publisher.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    problems = cleanup.remove_sandbox(sdir)
    if problems:
        log.warning("sandbox cleanup incomplete", problems=problems)
    log.info("shim exited", events_published=publisher.published, events_failed=publisher.failed)


async def _serve_metrics(sdir: paths.SandboxDir, metrics: ShimMetrics) -> MetricsServer | None:
    """Serve ``metrics`` on ``sdir.metrics_sock``; a shim without metrics still runs pods."""
    try:
        return await serve_metrics(sdir.metrics_sock, metrics)
    except OSError as exc:
        log.error("cannot serve metrics", socket=str(sdir.metrics_sock), error=str(exc))
        return None


def _cri_annotations(bundle: str) -> dict[str, str]:
    try:
        ann = read_annotations(bundle)
    except ValueError:
        return {}
    return {k: ann[k] for k in CRI_SANDBOX_ANNOTATIONS if k in ann}


__all__ = ["CRI_SANDBOX_ANNOTATIONS", "LISTEN_FD", "load_backend", "serve"]
