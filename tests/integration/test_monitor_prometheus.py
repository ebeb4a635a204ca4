"""A real Prometheus scrapes `pyvm monitor`, which scrapes several shim metrics endpoints.

The shims are fakes (``metrics_fakes.start_fake_sandbox``: real ``serve_metrics`` servers over a fake
sandbox source, laid out under a temp run root like real shims). When real pods serve metrics, the
end-to-end test replaces ``fake_pods`` with real ones and reuses ``MonitorStack``, ``query`` and the
assertions below: only the "simulate a hot-add" step changes (grow a container's memory limit).

Prometheus, the monitor and the shims are stopped in ``finally`` blocks, also on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "metrics"))
from metrics_fakes import FakeSandbox, MiB, cri_annotations, sandbox_id, start_fake_sandbox

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as resp:
        return resp.read()


async def wait_until(what: str, check: Callable[[], object], within: float, interval: float = 0.5) -> object:
    """Poll ``check`` (run in a thread) until it returns something truthy; fail after ``within`` s."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except Exception as exc:  # not up yet
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")


class MonitorStack:
    """`pyvm monitor` + Prometheus scraping it every second, as subprocesses."""

    def __init__(self, run_root: Path, workdir: Path) -> None:
        self.run_root = run_root
        self.workdir = workdir
        self.monitor_port = free_port()
        self.prom_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self.procs.append(
            subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
            )
        )
        log.close()

    async def start(self) -> None:
        env = dict(os.environ, PYVM_RUN_ROOT=str(self.run_root), PYTHONPATH=str(REPO))
        self._spawn(
            "monitor",
            [
                sys.executable,
                "-m",
                "shim.cli.pyvm",
                "monitor",
                "--listen",
                f"127.0.0.1:{self.monitor_port}",
                "--scrape-timeout",
                "2",
            ],
            env,
        )
        await wait_until("pyvm monitor", lambda: http_get(self.monitor_url + "/healthz") == b"ok\n", 30)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: pyvm\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{self.monitor_port}']}}]\n"
        )
        self._spawn(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}",
                "--log.level=warn",
            ],
        )
        await wait_until("prometheus ready", lambda: b"Ready" in http_get(self.prom_url + "/-/ready"), 60)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in self.workdir.glob("*.log")
        )

    def query(self, promql: str) -> list[dict]:
        url = self.prom_url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        doc = json.loads(http_get(url))
        assert doc["status"] == "success", doc
        return doc["data"]["result"]


@asynccontextmanager
async def monitor_stack(run_root: Path) -> AsyncIterator[MonitorStack]:
    workdir = Path(tempfile.mkdtemp(prefix="pyvm-prom-"))
    stack = MonitorStack(run_root, workdir)
    try:
        await stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@asynccontextmanager
async def fake_pods(run_root: Path, n: int) -> AsyncIterator[list[FakeSandbox]]:
    pods: list[FakeSandbox] = []
    try:
        for i in range(n):
            ann = cri_annotations(f"web-{i}-5d4f8c9b7-abcde", namespace=f"team-{i % 2}")
            pods.append(await start_fake_sandbox(run_root, sandbox_id(i), annotations=ann))
        yield pods
    finally:
        for p in pods:
            await p.close()


def by_sandbox(results: list[dict]) -> dict[str, dict]:
    return {r["metric"].get("sandbox_id", ""): r for r in results}


async def test_prometheus_sees_per_sandbox_series_and_a_memory_hot_add():
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} missing: install Debian's 'prometheus' package (hack/setup.sh does)")
    run_root = Path(tempfile.mkdtemp(prefix="pyvm-rr-", dir="/tmp"))  # short: unix socket paths
    try:
        async with fake_pods(run_root, 3) as pods, monitor_stack(run_root) as stack:
            ids = {p.sandbox_id for p in pods}

            # 1. every sandbox's series arrive with sandbox_id and the CRI labels
            def all_sandboxes() -> dict[str, dict] | None:
                got = by_sandbox(stack.query("pyvm_memory_configured_bytes"))
                return got if set(got) == ids else None

            got = await wait_until("per-sandbox series in Prometheus", all_sandboxes, 60)
            for p in pods:
                labels = got[p.sandbox_id]["metric"]
                assert labels["cri_uid"] == p.cri["cri_uid"]
                assert labels["cri_name"] == p.cri["cri_name"]
                assert labels["cri_namespace"] == p.cri["cri_namespace"]
                assert labels["job"] == "pyvm"
                assert float(got[p.sandbox_id]["value"][1]) == 512 * MiB
            for q in (
                'pyvm_hypervisor_info{accelerator="tcg"}',
                'pyvm_guest_meminfo_bytes{field="MemTotal"}',
                "pyvm_shim_rpc_duration_seconds_count",
                "pyvm_pod_overhead_memory_bytes",
            ):
                assert {r["metric"]["sandbox_id"] for r in stack.query(q)} == ids, q
            assert float(stack.query('up{job="pyvm"}')[0]["value"][1]) == 1
            assert float(stack.query("pyvm_monitor_running_shims")[0]["value"][1]) == 3
            assert float(stack.query("sum(pyvm_monitor_scrape_failures_total)")[0]["value"][1]) == 0

            # the Grafana dashboard's queries are valid PromQL over these series
            dashboard = json.loads((REPO / "deploy" / "grafana" / "pyvm-dashboard.json").read_text())
            for panel in dashboard["panels"]:
                for t in panel.get("targets", []):
                    expr = t["expr"].replace("$namespace", ".*").replace("$pod", ".*")
                    stack.query(expr.replace("$__rate_interval", "1m"))  # asserts status == success

            # 2. a memory hot-add on one sandbox shows in the hotplug counter and the guest gauge
            target = pods[1]
            before = target.source.guest_mem_total()
            target.source.hot_add(256 * MiB, target.metrics)
            sel = f'sandbox_id="{target.sandbox_id}"'

            def hot_add_visible() -> bool:
                ops = stack.query(
                    f'pyvm_memory_hotplug_operations_total{{{sel},direction="grow",mechanism="acpi"}}'
                )
                mem = stack.query(f'pyvm_guest_meminfo_bytes{{{sel},field="MemTotal"}}')
                plugged = stack.query(f"pyvm_memory_plugged_bytes{{{sel}}}")
                return (
                    bool(ops and mem and plugged)
                    and float(ops[0]["value"][1]) == 1
                    and float(mem[0]["value"][1]) == before + 256 * MiB
                    and float(plugged[0]["value"][1]) == 256 * MiB
                )

            await wait_until("hot-add in Prometheus", hot_add_visible, 30)
            # the other sandboxes did not move
            others = by_sandbox(stack.query('pyvm_guest_meminfo_bytes{field="MemTotal"}'))
            for p in pods:
                if p is not target:
                    assert float(others[p.sandbox_id]["value"][1]) == before
            assert not stack.query(
                f'pyvm_memory_hotplug_operations_total{{sandbox_id!="{target.sandbox_id}"}}'
            )
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
