#!/usr/bin/env python3
"""Micro-benchmark of ``shim/ttrpc`` alone (a report, not a timed test).

A bare ``shim.ttrpc.Server`` with a trivial ``State`` handler runs in its own process on a unix
socket; this process calls it N times per round and reports p50/p99 of the round trip, with two
callers:

- ``client``: our asyncio ``shim.ttrpc.Client`` (what bench-shim and containerd-facing code use);
- ``raw``: a blocking socket that writes a pre-encoded frame and reads the answer — the server's
  cost alone, without our client's.

``--containerd`` also starts a private containerd 1.6 with one runc task and one pyvm task (our shim
through the fake-backend TEST SEAM, as bench-shim does; needs root) and measures both shims with
both callers in the same rounds, alternating. ``--interceptor`` wraps the bare server's handler in
the shim's ``task_interceptor``; ``--no-eager`` serves State as a normal (task per call) Method. Besides wall-clock percentiles it reports each server process's CPU
time per call (utime+stime from /proc), which is far less sensitive to other load on the machine.

Usage: ``.venv/bin/python hack/bench-ttrpc.py [-n 2000] [-r 5] [--containerd] [--interceptor]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shim._pb.containerd.task.v2 import shim_pb2  # noqa: E402
from shim._pb.ttrpc import request_pb2  # noqa: E402
from shim.ttrpc import Client, Method, Server  # noqa: E402

TASK = "containerd.task.v2.Task"
_HEADER = struct.Struct(">IIBB")


# -- server process ----------------------------------------------------------------------------------


async def _serve(path: str, interceptor: bool, eager: bool) -> None:
    async def state(req: shim_pb2.StateRequest, ctx: object) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse(id=req.id, pid=42, status=2, bundle="/run/bundle/" + req.id)

    kw = {}
    if interceptor:
        from shim.api.interceptors import task_interceptor

        kw["interceptor"] = task_interceptor
    server = Server(**kw)
    server.register(
        TASK, {"State": Method(shim_pb2.StateRequest, shim_pb2.StateResponse, state, eager=eager)}
    )
    await server.serve_unix(path)
    print("ready", flush=True)
    # Runs until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()


# -- callers -----------------------------------------------------------------------------------------


async def _client_samples(path: str, cid: str, n: int) -> list[float]:
    client = await Client.connect_unix(path, timeout=5)
    try:
        req = shim_pb2.StateRequest(id=cid)
        for _ in range(50):
            await client.call(TASK, "State", req, shim_pb2.StateResponse, timeout=5)
        out = []
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            await client.call(TASK, "State", req, shim_pb2.StateResponse, timeout=5)
            out.append(clock() - t0)
        return out
    finally:
        await client.close()


def _raw_samples(path: str, cid: str, n: int) -> list[float]:
    """Blocking caller: one pre-encoded unary State request per call (same bytes as our client's,
    timeout_nano 2 s as containerd sends), stream ids odd and increasing."""
    body = request_pb2.Request(
        service=TASK,
        method="State",
        payload=shim_pb2.StateRequest(id=cid).SerializeToString(),
        timeout_nano=2_000_000_000,
    ).SerializeToString()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    out = []
    clock = time.perf_counter
    sid = 1
    try:
        for i in range(n + 50):
            frame = _HEADER.pack(len(body), sid, 1, 0) + body
            t0 = clock()
            s.sendall(frame)
            buf = s.recv(65536)
            while len(buf) < 10 or len(buf) < 10 + _HEADER.unpack_from(buf)[0]:
                buf += s.recv(65536)
            dt = clock() - t0
            if i >= 50:
                out.append(dt)
            sid += 2
        return out
    finally:
        s.close()


# -- driver ------------------------------------------------------------------------------------------


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _shim_pid(address: str) -> int:
    """The process listening on the abstract/unix socket ``address`` (ss is in iproute2)."""
    out = subprocess.run(["ss", "-xlpn"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if address in line and "pid=" in line:
            return int(line.split("pid=", 1)[1].split(",", 1)[0])
    raise SystemExit(f"no process listens on {address}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="calls per round and target")
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("--containerd", action="store_true", help="also measure the runc shim and our shim")
    ap.add_argument("--interceptor", action="store_true", help="wrap the bare server in task_interceptor")
    ap.add_argument("--no-eager", action="store_true", help="bare server: State not an eager Method")
    ap.add_argument("--no-raw", action="store_true", help="only the asyncio client as caller")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.interceptor, not args.no_eager))
        return 0

    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
        stack.callback(shutil.rmtree, tmp, True)
        sock = str(tmp / "s.sock")
        argv = [sys.executable, __file__, "--serve", sock]
        argv += ["--interceptor"] * args.interceptor + ["--no-eager"] * args.no_eager
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stack.callback(proc.wait, 10)
        stack.callback(proc.stdin.close)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("bench server did not start")

        # name -> (socket path, container id, server pid)
        targets: dict[str, tuple[str, str, int]] = {"bare-ttrpc": (sock, "c1", proc.pid)}
        if args.containerd:
            from tests.helpers.containerd import Containerd
            from tests.helpers.pyvm_vm import runc_and_pyvm_sleepers

            reason = Containerd.available()
            if reason:
                raise SystemExit(f"--containerd: {reason}")
            c = stack.enter_context(runc_and_pyvm_sleepers("bt-"))
            for name, cid in (("runc-shim", "runc1"), ("pyvm-shim", "pyvm1")):
                addr = c.shim_address(cid).removeprefix("unix://")
                targets[name] = (addr, cid, _shim_pid(addr))

        callers: dict[str, Callable[[str, str, int], list[float]]] = {
            "client": lambda p, cid, n: asyncio.run(_client_samples(p, cid, n)),
        }
        if not args.no_raw:
            callers["raw"] = _raw_samples
        p50: dict[tuple[str, str], list[float]] = {}
        p99: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for caller, fn in callers.items():
                for target, (path, cid, pid) in targets.items():
                    c0 = _cpu(pid)
                    samples = fn(path, cid, args.n)
                    cpu.setdefault((target, caller), []).append((_cpu(pid) - c0) / (args.n + 50))
                    p50.setdefault((target, caller), []).append(_pct(samples, 0.5))
                    p99.setdefault((target, caller), []).append(_pct(samples, 0.99))

        print(f"{args.rounds} rounds x {args.n} calls; load average {os.getloadavg()[0]:.1f}")
        for (target, caller), v in p50.items():
            print(
                f"  {target:10s} {caller:6s} p50 {statistics.median(v) * 1e6:6.1f} us "
                f"(rounds {' '.join(f'{x * 1e6:.0f}' for x in v)}), "
                f"p99 {statistics.median(p99[target, caller]) * 1e6:6.1f} us, "
                f"server cpu/call {statistics.median(cpu[target, caller]) * 1e6:5.1f} us"
            )
        if args.containerd:
            for caller in callers:
                ratios = [
                    a / b for a, b in zip(p50["pyvm-shim", caller], p50["runc-shim", caller], strict=True)
                ]
                print(
                    f"  ratio pyvm-shim/runc-shim p50 ({caller}): median {statistics.median(ratios):.2f}x "
                    f"(rounds {' '.join(f'{x:.2f}' for x in ratios)})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
