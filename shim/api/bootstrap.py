"""The shim binary's ``start`` and ``delete`` commands (containerd runtime-v2 binary contract).

``start`` is on containerd's critical path (every container start) and its stdout+stderr are read
as the answer, so this module imports only the standard library and stdlib-only ``shim`` modules;
protobuf is imported by ``delete`` alone, when it needs it.

Config knob for the transport (containerd 2.x can talk gRPC to shims): ``PYVM_SHIM_PROTOCOL`` in the
shim's environment (containerd 2.x: the runtime plugin's ``env`` list, or containerd's own env):

- ``ttrpc`` (default): print the plain address; works with containerd 1.6, 1.7 and 2.x;
- ``grpc``: serve gRPC and print ``{"version":3,"address":"unix://…","protocol":"grpc"}``
  (containerd 2.x only: 1.7 refuses version 3, 1.6 cannot speak gRPC to shims).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shim import paths
from shim.sandbox import persist
from shim.sandbox.pod import bundle_membership

PROTOCOL_ENV = "PYVM_SHIM_PROTOCOL"
#: Where the shim sockets go; containerd 1.6/1.7 hard-code /run/containerd/s. Tests move it.
SOCKET_DIR_ENV = paths.SHIM_SOCKET_DIR_ENV
#: The test seam: load a backend from "module:factory" (only with PYVM_ENABLE_TEST_SEAMS=1).
TEST_BACKEND_ENV = "PYVM_TEST_BACKEND"
TEST_SEAMS_ENV = "PYVM_ENABLE_TEST_SEAMS"
SOCKET_PATH_LIMIT = 106
#: exit status ``delete`` reports: the process is gone as if SIGKILLed (runc and Kata do the same)
DELETE_EXIT_STATUS = 128 + 9


class UsageError(Exception):
    """Bad command line or environment; ``main`` prints it and exits 1 (containerd shows it)."""


@dataclass
class Flags:
    """The Go-flag-style options containerd passes (``-namespace NS -id ID ... start|delete``)."""

    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    action: str = ""


def socket_dir() -> Path:
    return paths.shim_socket_dir()


def socket_path(containerd_address: str, namespace: str, group_id: str) -> str:
    """``<socket dir>/sha256(filepath.Join(address, ns, group))`` as the Go shim library computes it."""
    joined = os.path.normpath(os.path.join(containerd_address, namespace, group_id))
    path = str(socket_dir() / hashlib.sha256(joined.encode()).hexdigest())
    if len(path) > SOCKET_PATH_LIMIT:
        raise UsageError(f"shim socket path {path} is longer than {SOCKET_PATH_LIMIT} bytes")
    return path


def protocol() -> str:
    value = os.environ.get(PROTOCOL_ENV, "ttrpc") or "ttrpc"
    if value not in ("ttrpc", "grpc"):
        raise UsageError(f"{PROTOCOL_ENV}={value!r}: must be 'ttrpc' or 'grpc'")
    return value


def check_test_seam() -> str | None:
    """The test backend spec, or ``None``. :raises UsageError: the seam is used without its guard."""
    spec = os.environ.get(TEST_BACKEND_ENV)
    if not spec:
        return None
    if os.environ.get(TEST_SEAMS_ENV) != "1":
        raise UsageError(
            f"{TEST_BACKEND_ENV} is a test seam and is refused unless {TEST_SEAMS_ENV}=1; "
            "unset it in production"
        )
    return spec


def _is_live(path: str) -> bool:
    """Does something accept connections on the unix socket ``path``?"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _write_address(bundle: str, address: str) -> None:
    tmp = os.path.join(bundle, ".address")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(address)
    os.replace(tmp, os.path.join(bundle, "address"))


def _listen(path: str) -> socket.socket | None:
    """A listening 0600 socket at ``path``, or ``None`` if a live shim already listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if _is_live(path):
                sock.close()
                return None
            os.unlink(path)  # stale: the shim that made it is gone
            sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _daemon_argv(flags: Flags, extra: list[str]) -> list[str]:
    exe = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if exe and os.access(exe, os.X_OK) and not exe.endswith(".py"):
        base = [exe]
    else:  # run as ``python -m shim.cli.shim_main`` (tests, benchmarks)
        base = [sys.executable, "-m", "shim.cli.shim_main"]
    argv = [*base, "-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    if flags.publish_binary:
        argv += ["-publish-binary", flags.publish_binary]
    if flags.debug:
        argv.append("-debug")
    return argv + extra


def _spawn(argv: list[str], bundle: str, sock: socket.socket | None) -> None:
    """Start the serving daemon detached: new session, stdio on /dev/null, ``sock`` as fd 3.

    Inheriting our stdout would keep containerd's pipe open and make ``start`` hang forever.
    """
    pass_fds: tuple[int, ...] = ()
    if sock is not None:
        if sock.fileno() != 3:
            os.dup2(sock.fileno(), 3)
        os.set_inheritable(3, True)
        pass_fds = (3,)
    subprocess.Popen(
        argv,
        cwd=bundle,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=pass_fds,
        close_fds=True,
    )


def _wait_live(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _is_live(path):
        if time.monotonic() > deadline:
            raise UsageError(f"the shim daemon did not listen on {path} within {timeout}s")
        time.sleep(0.01)


def start(flags: Flags) -> str:
    """Run ``start`` in the bundle (cwd); returns what to print (address or bootstrap JSON).

    :raises UsageError: missing flags, bad environment, socket path too long.
    :raises AlreadyExists: the sandbox id is live in another containerd namespace.
    :raises OSError: the socket cannot be created.
    """
    if not flags.id or not flags.address or not flags.namespace:
        raise UsageError("start needs -namespace, -address and -id")
    check_test_seam()
    proto = protocol()
    bundle = os.getcwd()
    group = bundle_membership(flags.id, bundle).sandbox_id
    persist.refuse_other_namespace(paths.SandboxDir.for_sandbox(group), flags.namespace)
    path = socket_path(flags.address, flags.namespace, group)
    address = "unix://" + path
    os.makedirs(socket_dir(), mode=0o700, exist_ok=True)
    if proto == "ttrpc":
        sock = _listen(path)
        if sock is not None:
            try:
                _spawn(_daemon_argv(flags, []), bundle, sock)
            finally:
                sock.close()
    elif not _is_live(path):
        if os.path.lexists(path):
            os.unlink(path)
        _spawn(_daemon_argv(flags, ["-socket", path]), bundle, None)
        _wait_live(path, 10.0)
    _write_address(bundle, address)
    if proto == "grpc":
        return json.dumps({"version": 3, "address": address, "protocol": "grpc"})
    return address


def delete(flags: Flags) -> tuple[bytes, list[str]]:
    """Offline cleanup of exactly container ``-id``; returns (DeleteResponse bytes, warnings).

    Removes the container's part of its sandbox's share. If the container is the sandbox itself and
    its daemon is gone, also the whole sandbox (leftover helpers, mounts, state dir) and its socket.
    Idempotent: a second run finds nothing and still answers.
    """
    # Deferred imports: keep ``start`` (which shares this module) free of protobuf and structlog.
    from datetime import UTC, datetime

    from shim._pb.containerd.task.v2 import shim_pb2
    from shim.api.translate import timestamp
    from shim.ids import validate_id
    from shim.sandbox import cleanup

    if not flags.id:
        raise UsageError("delete needs -id")
    validate_id(flags.id, kind="container id")
    bundle = flags.bundle or os.getcwd()
    warnings: list[str] = []
    try:
        member = bundle_membership(flags.id, bundle)
    except ValueError as exc:
        warnings.append(f"{bundle}/config.json unreadable ({exc}); treating {flags.id} as its own sandbox")
        member = bundle_membership(flags.id, "/nonexistent")
    warnings += cleanup.unmount_under(Path(bundle) / "rootfs")
    sdir = paths.SandboxDir.for_sandbox(member.sandbox_id)
    record = persist.load(sdir)
    alive = record is not None and persist.daemon_alive(record)
    # the same id in another namespace owns the directory (our start was refused): not ours to clean
    ours = record is None or not flags.namespace or record.namespace == flags.namespace
    if not ours:
        assert record is not None
        warnings.append(f"{sdir.root} belongs to namespace {record.namespace!r}; left alone")
    if ours and sdir.root.exists():
        warnings += cleanup.remove_container(sdir, flags.id)
        if record is not None and not alive and flags.id in record.containers:
            del record.containers[flags.id]
            persist.save(sdir, record)
    if member.is_sandbox and (not alive or not ours):
        if ours and sdir.root.exists():
            warnings += cleanup.remove_sandbox(sdir)
        if flags.address and flags.namespace:
            path = socket_path(flags.address, flags.namespace, member.sandbox_id)
            if os.path.lexists(path) and not _is_live(path):
                os.unlink(path)
    resp = shim_pb2.DeleteResponse(exit_status=DELETE_EXIT_STATUS, exited_at=timestamp(datetime.now(UTC)))
    return resp.SerializeToString(), warnings


__all__ = [
    "DELETE_EXIT_STATUS",
    "PROTOCOL_ENV",
    "SOCKET_DIR_ENV",
    "TEST_BACKEND_ENV",
    "TEST_SEAMS_ENV",
    "Flags",
    "UsageError",
    "check_test_seam",
    "delete",
    "protocol",
    "socket_dir",
    "socket_path",
    "start",
]
