#!/usr/bin/env python3
"""Benchmark the shim binary contract (a report, not a timed test).

1. ``start`` cold time: wall time of ``containerd-shim-pyvm-v2 ... start`` (fresh process each time,
   new bundle and socket), median of N. Target <= 150 ms. Each spawned daemon is shut down again.
2. ttrpc ``State`` round trip, p50 over M calls with our ttrpc client, against our shim and against
   containerd's stock runc shim, both serving a task started by the same private containerd 1.6 in
   this run. R rounds, the two shims alternating inside each round (which one goes first alternates
   too), so drift of a shared host hits both alike; the ratio reported is the median of the per-round
   ratios. Target: ours <= 1.5x runc's. Our shim serves its task through the explicit TEST SEAM
   (``PYVM_TEST_BACKEND=shim.testing.fake_backend:FakeBackend``): there is no VM backend yet, and
   ``State`` never touches the backend anyway.

Needs root (private containerd). Usage: ``.venv/bin/python hack/bench-shim.py [-n 20] [-m 2000] [-r 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from google.protobuf import empty_pb2  # noqa: E402

from shim._pb.containerd.task.v2 import shim_pb2  # noqa: E402
from shim.ttrpc import Client  # noqa: E402
from tests.helpers.containerd import Containerd  # noqa: E402
from tests.helpers.pyvm_vm import runc_and_pyvm_sleepers  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SHIM = VENV_BIN / "containerd-shim-pyvm-v2"
TASK = "containerd.task.v2.Task"


async def _shutdown(address: str, cid: str) -> None:
    client = await Client.connect_unix(address.removeprefix("unix://"), timeout=5)
    try:
        await client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id=cid), empty_pb2.Empty, timeout=5)
    finally:
        await client.close()


def bench_start(n: int) -> list[float]:
    base = Path(tempfile.mkdtemp(prefix="pyvm-bench-", dir="/tmp"))
    env = dict(os.environ, PYVM_SHIM_SOCKET_DIR=str(base / "s"), PYVM_RUN_ROOT=str(base / "run"))
    times: list[float] = []
    try:
        for i in range(n):
            cid = f"bench{i}"
            bundle = base / cid
            bundle.mkdir()
            (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
            argv = [str(SHIM), "-namespace", "bench", "-address", str(base / "c.sock"), "-id", cid, "start"]
            t0 = time.perf_counter()
            r = subprocess.run(argv, cwd=bundle, env=env, capture_output=True, stdin=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
            if r.returncode != 0:
                raise SystemExit(f"start failed: {r.stderr.decode()}")
            asyncio.run(_shutdown(r.stdout.decode(), cid))
            time.sleep(0.2)  # let the daemon exit; it competes for the 2 cores otherwise
    finally:
        time.sleep(0.5)
        shutil.rmtree(base, ignore_errors=True)
    return times


def bench_floor(n: int) -> list[float]:
    """The interpreter's own start (``python -c pass`` with site, as the console script runs): the
    part of ``start`` that is not ours, measured under the same load."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return times


async def _state_p50(socket_path: str, cid: str, m: int) -> float:
    client = await Client.connect_unix(socket_path, timeout=5)
    try:
        req = shim_pb2.StateRequest(id=cid)
        for _ in range(50):  # warm up
            await client.call(TASK, "State", req, shim_pb2.StateResponse, timeout=5)
        samples = []
        for _ in range(m):
            t0 = time.perf_counter()
            await client.call(TASK, "State", req, shim_pb2.StateResponse, timeout=5)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
    finally:
        await client.close()


def bench_state(m: int, rounds: int) -> tuple[list[float], list[float]]:
    """Per-round State p50s (ours, runc's), the two shims alternating within each round."""
    with runc_and_pyvm_sleepers("pyvm-bench-") as c:
        targets = {"runc": ("runc1", c.shim_address("runc1")), "pyvm": ("pyvm1", c.shim_address("pyvm1"))}
        p50: dict[str, list[float]] = {"runc": [], "pyvm": []}
        for r in range(rounds):
            order = ("runc", "pyvm") if r % 2 == 0 else ("pyvm", "runc")
            for name in order:
                cid, address = targets[name]
                p50[name].append(asyncio.run(_state_p50(address, cid, m)))
        return p50["pyvm"], p50["runc"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="start runs (median)")
    ap.add_argument("-m", type=int, default=2000, help="State calls per shim and round (p50)")
    ap.add_argument("-r", "--rounds", type=int, default=5, help="State rounds, shims alternating")
    args = ap.parse_args()
    if not SHIM.exists():
        print(f"{SHIM} missing: run hack/setup.sh", file=sys.stderr)
        return 2
    floor = statistics.median(bench_floor(args.n)) * 1000
    starts = bench_start(args.n)
    med = statistics.median(starts) * 1000
    print(
        f"python interpreter floor (python -c pass): median {floor:.1f} ms; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"start cold time: median {med:.1f} ms over {args.n} runs (min {min(starts) * 1000:.1f}, "
        f"max {max(starts) * 1000:.1f}); target <= 150 ms: {'OK' if med <= 150 else 'MISSED'}"
    )
    reason = Containerd.available()
    if reason:
        print(f"State round trip: skipped ({reason})")
        return 0
    ours, runc = bench_state(args.m, args.rounds)
    ratios = [a / b for a, b in zip(ours, runc, strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"State round trip p50 (median of {args.rounds} rounds x {args.m} calls, alternating): "
        f"pyvm {statistics.median(ours) * 1e6:.0f} us, runc shim {statistics.median(runc) * 1e6:.0f} us; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  per-round pyvm {' '.join(f'{x * 1e6:.0f}' for x in ours)} us; "
        f"runc {' '.join(f'{x * 1e6:.0f}' for x in runc)} us"
    )
    print(
        f"  ratio pyvm/runc: median of per-round ratios {ratio:.2f}x "
        f"(rounds {' '.join(f'{x:.2f}' for x in ratios)}); target <= 1.5x: {'OK' if ratio <= 1.5 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
