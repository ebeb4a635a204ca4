"""``python3 -m shim.guestagent``: the pyvm guest agent (PID 1 in the VM, or a subreaper in tests).

python3 -m shim.guestagent                       serve on the virtio-serial port io.pyvm.agent.0
python3 -m shim.guestagent --port /dev/vport0p1  serve on this port (or a unix socket to connect to)
python3 -m shim.guestagent --listen unix:PATH    listen on a unix socket (tests on a host)

As PID 1 it owns the guest kernel (``--guest-kernel``): CreateSandbox sets the wall clock and seeds
the RNG, PrepareTemplate drops caches. Anywhere else it leaves the kernel alone unless told.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim import log as shimlog
from shim.guestagent import guest, transport
from shim.guestagent.agent import Agent, Config
from shim.guestagent.reaper import Reaper, become_subreaper
from shim.guestagent.service import AGENT_VERSION, build_server

log = shimlog.get_logger("shim.guestagent")
#: set by pyvm-init (shim/guestimage/guest_init.py) to the pid of its background module loader
MODULES_LOADER_ENV = "PYVM_MODULES_LOADER_PID"


@dataclass(frozen=True)
class Options:
    """The command line; the defaults are what PID 1 in the guest runs with."""

    listen: str | None = None
    port: Path | None = None
    port_name: str = transport.AGENT_PORT_NAME
    log_port_name: str = transport.LOG_PORT_NAME
    log_level: str = field(default_factory=lambda: os.environ.get("PYVM_AGENT_LOG_LEVEL", "info"))
    containers_root: Path = Config.containers_root
    crun_root: str = Config.crun_root
    crun: str = Config.crun_binary
    cgroup_parent: str = Config.cgroup_parent
    exit_io_grace: float = Config.exit_io_grace
    guest_kernel: bool = field(default_factory=lambda: os.getpid() == 1)
    share_wait: float = Config.share_wait


def parse_args(argv: list[str] | None = None) -> Options:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        # the guest's PID 1 passes no arguments: importing argparse is ~0.15 s of a TCG boot
        return Options()
    import argparse

    d = Options()
    ap = argparse.ArgumentParser(
        prog="python3 -m shim.guestagent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--listen", help="unix:PATH: listen on a unix socket instead of the port")
    ap.add_argument("--port", type=Path, help="the agent port device (default: found by --port-name)")
    ap.add_argument("--port-name", default=d.port_name)
    ap.add_argument("--log-port-name", default=d.log_port_name, help="'' disables the log port")
    ap.add_argument("--log-level", default=d.log_level)
    ap.add_argument("--containers-root", type=Path, default=d.containers_root)
    ap.add_argument("--crun-root", default=d.crun_root)
    ap.add_argument("--crun", default=d.crun)
    ap.add_argument("--cgroup-parent", default=d.cgroup_parent)
    ap.add_argument("--exit-io-grace", type=float, default=d.exit_io_grace)
    ap.add_argument(
        "--guest-kernel",
        action=argparse.BooleanOptionalAction,
        default=d.guest_kernel,
        help="set the clock, seed the RNG and drop caches when asked (default: only as PID 1)",
    )
    ap.add_argument(
        "--share-wait", type=float, default=d.share_wait, help="seconds to wait for an unknown virtio-fs tag"
    )
    return Options(**vars(ap.parse_args(argv)))


def _protobuf_implementation() -> str:
    """``upb`` (the compiled wheel the guest image ships) or ``python`` (a fallback: slower)."""
    try:
        from google.protobuf.internal import api_implementation

        return str(api_implementation.Type())
    except ImportError:
        return "unknown"


async def amain(args: Options) -> None:
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.start()
    agent = Agent(
        reaper,
        Config(
            containers_root=args.containers_root,
            crun_root=args.crun_root,
            crun_binary=args.crun,
            cgroup_parent=args.cgroup_parent,
            exit_io_grace=args.exit_io_grace,
            guest_kernel=args.guest_kernel,
            share_wait=args.share_wait,
            modules_loader_pid=_modules_loader_pid(),
        ),
    )
    agent.start()
    server = build_server(agent)
    stop = asyncio.Event()
    if os.getpid() != 1:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        if args.listen:
            scheme, _, path = args.listen.partition(":")
            if scheme != "unix" or not path:
                raise SystemExit(f"--listen wants unix:PATH, not {args.listen!r}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            await server.serve_unix(path)
            log.info("agent serving", listen=path, version=AGENT_VERSION, pid=os.getpid(), **_facts())
            await stop.wait()
        else:
            log.info(
                "agent serving", port=str(args.port or args.port_name), version=AGENT_VERSION, **_facts()
            )
            serving = asyncio.create_task(transport.serve_port(server, args.port, args.port_name))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            serving.cancel()
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    finally:
        log.info("agent stopping")
        await server.close()
        # leave nothing behind: every container is deleted with the agent
        await agent.destroy_sandbox()
        await agent.close()
        reaper.stop()


def _modules_loader_pid() -> int | None:
    """The pid pyvm-init's background module loader got (guest_init.py exports it); popped so
    that no child of the agent inherits it."""
    value = os.environ.pop(MODULES_LOADER_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _facts() -> dict[str, Any]:
    return {"protobuf": _protobuf_implementation(), "uptime": _uptime()}


def _uptime() -> float | None:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    streams: list[object] = [sys.stderr]
    if args.log_port_name and not args.listen:
        port = transport.find_port(args.log_port_name)
        if port is not None:
            streams.append(transport.LogPort(port))
    shimlog.configure(level=args.log_level, stream=transport.Tee(*streams))  # type: ignore[arg-type]
    if not args.listen:
        try:
            if guest.loopback_up():
                log.info("loopback up")
        except OSError as exc:
            log.warning("cannot bring loopback up", error=str(exc))
    if not become_subreaper():
        log.warning("not a subreaper: exit statuses of container processes may be lost")
    if os.getpid() == 1:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            asyncio.run(amain(args))
            return 0
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            log.exception("agent crashed")
            if os.getpid() != 1:
                return 1
            time.sleep(1)  # PID 1 must not exit: the kernel would panic


if __name__ == "__main__":
    sys.exit(main())
