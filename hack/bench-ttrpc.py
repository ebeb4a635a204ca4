#!/usr/bin/env python3
"""Micro-benchmark of ``shim/ttrpc`` alone (a report, not a timed test).

A bare ``shim.ttrpc.Server`` with a trivial ``State`` handler runs in its own process on a unix
socket; this process calls it N times per round and reports p50/p99 of the round trip, with two
callers:

- ``client``: our asyncio ``shim.ttrpc.Client`` (what bench-shim and containerd-facing code use);
- ``raw``: a blocking socket that writes a pre-encoded frame and reads the answer — the server's
  cost alone, without our client's.

``--runc`` also starts a private containerd 1.6 with one runc task (needs root) and measures its
runc shim with both callers in the same rounds, alternating, as the reference. ``--interceptor``
wraps the bare server's handler in the shim's ``task_interceptor``.

Usage: ``.venv/bin/python hack/bench-ttrpc.py [-n 2000] [-r 5] [--runc] [--interceptor]``.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def _serve(path: str, interceptor: bool) -> None:
    async def state(req: shim_pb2.StateRequest, ctx: object) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse(id=req.id, pid=42, status=2, bundle="/run/bundle/" + req.id)

    kw = {}
    if interceptor:
        from shim.api.interceptors import task_interceptor

        kw["interceptor"] = task_interceptor
    server = Server(**kw)
    server.register(TASK, {"State": Method(shim_pb2.StateRequest, shim_pb2.StateResponse, state)})
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="calls per round and target")
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("--runc", action="store_true", help="also measure containerd's runc shim")
    ap.add_argument("--interceptor", action="store_true", help="wrap the bare server in task_interceptor")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.interceptor))
        return 0

    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
        stack.callback(shutil.rmtree, tmp, True)
        sock = str(tmp / "s.sock")
        argv = [sys.executable, __file__, "--serve", sock] + (["--interceptor"] if args.interceptor else [])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stack.callback(proc.wait, 10)
        stack.callback(proc.stdin.close)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("bench server did not start")

        targets: dict[str, tuple[str, str]] = {"pyvm-ttrpc": (sock, "c1")}
        if args.runc:
            from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir

            reason = Containerd.available()
            if reason:
                raise SystemExit(f"--runc: {reason}")
            img = short_base_dir("bt-img-")
            stack.callback(shutil.rmtree, img, True)
            c = stack.enter_context(Containerd())
            c.import_image(build_busybox_image(img / "bb.tar"))
            c.ctr("run", "-d", BUSYBOX_REF, "runc1", "sleep", "600", check=True)
            targets["runc-shim"] = (c.shim_address("runc1").removeprefix("unix://"), "runc1")

        callers: dict[str, Callable[[str, str, int], list[float]]] = {
            "client": lambda p, cid, n: asyncio.run(_client_samples(p, cid, n)),
            "raw": _raw_samples,
        }
        p50: dict[tuple[str, str], list[float]] = {}
        p99: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for caller, fn in callers.items():
                for target, (path, cid) in targets.items():
                    samples = fn(path, cid, args.n)
                    p50.setdefault((target, caller), []).append(_pct(samples, 0.5))
                    p99.setdefault((target, caller), []).append(_pct(samples, 0.99))
        import os

        print(f"{args.rounds} rounds x {args.n} calls; load average {os.getloadavg()[0]:.1f}")
        for (target, caller), v in p50.items():
            print(
                f"  {target:11s} {caller:6s} p50 median {statistics.median(v) * 1e6:6.1f} us "
                f"(rounds {' '.join(f'{x * 1e6:.0f}' for x in v)}), "
                f"p99 median {statistics.median(p99[target, caller]) * 1e6:6.1f} us"
            )
        if args.runc:
            for caller in callers:
                ratios = [a / b for a, b in zip(p50["pyvm-ttrpc", caller], p50["runc-shim", caller], strict=True)]
                print(f"  ratio pyvm-ttrpc/runc-shim ({caller}): median {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
