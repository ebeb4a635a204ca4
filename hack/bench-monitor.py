#!/usr/bin/env python3
"""Benchmark one `pyvm monitor` scrape over N fake sandboxes (default 10): duration and bytes.

Targets (issue 6): one scrape < 1 s with 10 sandboxes; each sandbox adds < 20 KiB. The fake shims
(tests/unit/metrics/metrics_fakes.py) are real `serve_metrics` endpoints with a running pod's worth of
RPC/agent/boot observations; they share this process, the monitor runs as its own process.

    .venv/bin/python hack/bench-monitor.py [--sandboxes 10] [--rounds 20] [--hung 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit" / "metrics"))
from metrics_fakes import (  # noqa: E402
    FakeSandboxSource,
    HungSocket,
    cri_annotations,
    sandbox_id,
    start_fake_sandbox,
)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, gz: bool = False) -> tuple[bytes, float]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gz else {})
    t0 = time.perf_counter()
    with _OPENER.open(req, timeout=30) as resp:
        body = resp.read()
    return body, time.perf_counter() - t0


async def measure(port: int, rounds: int) -> tuple[list[float], int, int]:
    url = f"http://127.0.0.1:{port}/metrics"
    await asyncio.to_thread(get, url)  # warm-up
    times = []
    for _ in range(rounds):
        body, dt = await asyncio.to_thread(get, url)
        times.append(dt)
    gz, _ = await asyncio.to_thread(get, url, True)
    return times, len(body), len(gz)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sandboxes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--hung", type=int, default=0, help="extra sandboxes whose socket never answers")
    ap.add_argument("--scrape-timeout", type=float, default=2.0)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="pyvm-bench-", dir="/tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    monitor = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "shim.cli.pyvm",
            "monitor",
            "--listen",
            f"127.0.0.1:{port}",
            "--run-root",
            str(root),
            "--scrape-timeout",
            str(args.scrape_timeout),
            "--log-level",
            "error",
        ],
        env=env,
    )
    pods, hung = [], []
    try:
        for _ in range(100):
            try:
                await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                await asyncio.sleep(0.1)
        base_times, base_bytes, base_gz = await measure(port, args.rounds)
        for i in range(args.sandboxes):
            ann = cri_annotations(f"web-{i}-5d4f8c9b7-abcde", namespace="default")
            # what shim.sandbox.metrics_source reports for a running pod (the agent gives no load)
            src = FakeSandboxSource(load=None, containers=[sandbox_id(i), sandbox_id(1000 + i)])
            pods.append(await start_fake_sandbox(root, sandbox_id(i), annotations=ann, source=src))
        for i in range(args.hung):
            hung.append(await HungSocket().start(root / "sbs" / f"hung{i}" / "metrics.sock"))
        times, nbytes, ngz = await measure(port, args.rounds)
        single = len(pods[0].metrics.render()) if pods else 0
    finally:
        monitor.terminate()
        await asyncio.wait_for(monitor.wait(), 10)
        for p in pods:
            await p.close()
        for h in hung:
            await h.close()
        shutil.rmtree(root, ignore_errors=True)

    n = max(args.sandboxes, 1)
    per = (nbytes - base_bytes) / n
    per_gz = (ngz - base_gz) / n
    print(f"sandboxes: {args.sandboxes} (+{args.hung} hung), rounds: {args.rounds}")
    print(f"scrape, no sandboxes:  median {statistics.median(base_times) * 1000:.1f} ms, {base_bytes} B")
    print(
        f"scrape, {args.sandboxes} sandboxes:  median {statistics.median(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms, {nbytes} B ({ngz} B gzip)"
    )
    print(
        f"per sandbox: {per / 1024:.1f} KiB ({per_gz / 1024:.2f} KiB gzip); one shim's own output: {single / 1024:.1f} KiB"
    )
    ok_time = max(times) < 1.0
    ok_size = per < 20 * 1024
    print(
        f"target scrape < 1 s: {'OK' if ok_time else 'MISSED'}; target < 20 KiB/sandbox (uncompressed): "
        f"{'OK' if ok_size else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
