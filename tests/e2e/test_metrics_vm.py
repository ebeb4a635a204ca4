"""Metrics of a REAL pyvm VM, end to end: ``ctr run --runtime io.containerd.pyvm.v2`` under a private
containerd 1.6, ``pyvm monitor`` over the shim's ``metrics.sock``, and a real Prometheus scraping the
monitor (the same stack as tests/integration/test_monitor_prometheus.py, there over fake shims).

What it proves: per-sandbox series carry ``sandbox_id`` and the CRI labels (from the annotations the
shim keeps in state.json); the accelerator label says tcg; QEMU's RSS and the guest's MemTotal are
there; raising the container's memory limit (``Update`` over ttrpc: ctr 1.6 has no ``task update``)
hot-adds memory, which moves the hotplug counter and the guest MemTotal gauge, in the monitor and in
Prometheus. Also: the guest agent's log lands in the sandbox's ``guest.log`` (virtio-serial port
``io.pyvm.log.0``). Everything is torn down even on failure.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2
from prometheus_client.parser import text_string_to_metric_families

from shim._pb.containerd.task.v2 import shim_pb2
from shim.ttrpc import Client
from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir
from tests.helpers.pyvm_vm import RUNTIME, VENV_BIN, force_clean, vm_skip_reason, write_config
from tests.integration.test_monitor_prometheus import PROMETHEUS, http_get, monitor_stack, wait_until
from tests.unit.metrics.metrics_fakes import promtool_check

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
CID = "mtest"
#: one TCG boot with other engineers' VMs on the same 2 cores
RUN_TIMEOUT = 300
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
CRI = {
    "io.kubernetes.cri.sandbox-uid": "3f1c2a9e-7d4b-4c61-9f0e-5b8a2d6c1e77",
    "io.kubernetes.cri.sandbox-name": "web-0",
    "io.kubernetes.cri.sandbox-namespace": "team-a",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def pick(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    want = set(labels.items())
    return [(dict(lbl), v) for (n, lbl), v in samples.items() if n == name and want <= lbl]


def one(samples: Samples, name: str, **labels: str) -> float | None:
    found = pick(samples, name, **labels)
    return found[0][1] if len(found) == 1 else None


async def update_memory_limit(shim_socket: str, limit: int) -> None:
    """containerd's Update, straight to the shim (ctr 1.6 has no ``task update``)."""
    client = await Client.connect_unix(shim_socket, timeout=10)
    try:
        body = json.dumps({"memory": {"limit": limit}}).encode()
        req = shim_pb2.UpdateTaskRequest(id=CID, resources=any_pb2.Any(type_url=RESOURCES_URL, value=body))
        await client.call("containerd.task.v2.Task", "Update", req, empty_pb2.Empty, timeout=RUN_TIMEOUT)
    finally:
        await client.close()


async def test_real_vm_metrics_through_monitor_and_prometheus(tmp_path: Path) -> None:
    reason = Containerd.available() or vm_skip_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which(PROMETHEUS) is None:
        pytest.fail(f"{PROMETHEUS} missing: install Debian's 'prometheus' package (hack/setup.sh does)")
    base = short_base_dir("pyvm-mvm-")
    run_root = base / "run"
    run_root.mkdir()
    # a small guest: pc-dimm hotplug (x86 default), 512 MiB at boot
    config = write_config(base / "pyvm.toml", default_memory=512, max_memory=4096)
    c = Containerd(
        base / "ctrd", extra_path=[VENV_BIN], env={"PYVM_RUN_ROOT": str(run_root), "PYVM_CONFIG": str(config)}
    )
    try:
        with c:
            c.import_image(build_busybox_image(base / "bb.tar"))
            ann = [a for k, v in CRI.items() for a in ("--annotation", f"{k}={v}")]
            r = c.ctr(
                "run", "-d", "--runtime", RUNTIME, "--memory-limit", str(256 * MiB), *ann,
                BUSYBOX_REF, CID, "sleep", "900", timeout=RUN_TIMEOUT,
            )  # fmt: skip
            assert r.returncode == 0, (r.stdout, r.stderr, c.log_tail())
            sdir = run_root / "sbs" / CID
            assert (sdir / "metrics.sock").stat().st_mode & 0o777 == 0o600
            state = json.loads((sdir / "state.json").read_text())
            assert state["annotations"] == CRI, state
            await _check_metrics(c, sdir)
    finally:
        force_clean(base, run_root)  # VM processes, mounts, files: whatever c.stop() did not take


async def _check_metrics(c: Containerd, sdir: Path) -> None:
    async with monitor_stack(sdir.parent.parent) as stack:
        mine = {"sandbox_id": CID, "cri_uid": CRI["io.kubernetes.cri.sandbox-uid"], "cri_name": "web-0"}

        def scrape() -> Samples:
            return parse(http_get(stack.monitor_url + "/metrics", timeout=30).decode())

        def scraped(pred: Callable[[Samples], object]) -> Callable[[], object]:
            def check() -> object:
                s = scrape()
                return s if pred(s) else None

            return check

        # the first scrapes may time out on the guest stats (TCG): wait for MemTotal
        s0: Samples = await wait_until(  # type: ignore[assignment]
            "guest MemTotal in the monitor",
            scraped(lambda s: one(s, "pyvm_guest_meminfo_bytes", field="MemTotal", **mine)),
            120,
        )
        body = http_get(stack.monitor_url + "/metrics", timeout=30)
        lint = promtool_check(body)
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
        info = pick(s0, "pyvm_hypervisor_info", **mine)
        assert info and info[0][0]["accelerator"] == "tcg", info
        assert info[0][0]["cri_namespace"] == "team-a"
        assert (one(s0, "pyvm_hypervisor_resident_memory_bytes", process="qemu", **mine) or 0) > 0
        total0 = one(s0, "pyvm_guest_meminfo_bytes", field="MemTotal", **mine)
        assert total0 and 256 * MiB < total0 <= 1024 * MiB, total0  # 512 MiB + the 256 MiB limit
        grows0 = one(s0, "pyvm_memory_hotplug_operations_total", direction="grow", mechanism="acpi", **mine)
        assert grows0 and grows0 >= 1, "the create-time grow (limit 256 MiB) was not counted"
        assert (one(s0, "pyvm_hypervisor_boot_duration_seconds_count", **mine) or 0) == 1
        assert one(s0, "pyvm_shim_rpc_duration_seconds_count", method="Create", code="OK", **mine) == 1
        usage = pick(s0, "pyvm_guest_container_memory_usage_bytes", container_id=CID, **mine)
        assert usage and usage[0][1] > 0, usage
        print(f"monitor output with one real sandbox: {len(body)} bytes")

        # Prometheus sees the same
        await wait_until(
            "prometheus: accelerator and MemTotal",
            lambda: (
                stack.query(f'pyvm_hypervisor_info{{sandbox_id="{CID}",accelerator="tcg"}}')
                and stack.query(f'pyvm_guest_meminfo_bytes{{sandbox_id="{CID}",field="MemTotal"}}')
            ),
            60,
        )

        # raise the limit: 256 -> 768 MiB (the VM grows by 512 MiB)
        await update_memory_limit(c.shim_address(CID), 768 * MiB)
        s1: Samples = await wait_until(  # type: ignore[assignment]
            "hot-add in the monitor",
            scraped(
                lambda s: (
                    (
                        one(
                            s,
                            "pyvm_memory_hotplug_operations_total",
                            direction="grow",
                            mechanism="acpi",
                            **mine,
                        )
                        or 0
                    )
                    > grows0
                    and (one(s, "pyvm_guest_meminfo_bytes", field="MemTotal", **mine) or 0)
                    >= total0 + 384 * MiB
                )
            ),
            120,
        )
        assert (
            one(s1, "pyvm_memory_hotplug_bytes_total", direction="grow", mechanism="acpi", **mine) or 0
        ) >= 768 * MiB
        await wait_until(
            "prometheus: hot-add counter and MemTotal moved",
            lambda: (
                float(
                    stack.query(
                        f'pyvm_memory_hotplug_operations_total{{sandbox_id="{CID}",direction="grow"}}'
                    )[0]["value"][1]
                )
                > grows0
                and float(
                    stack.query(f'pyvm_guest_meminfo_bytes{{sandbox_id="{CID}",field="MemTotal"}}')[0][
                        "value"
                    ][1]
                )
                >= total0 + 384 * MiB
            ),
            60,
        )

        # the agent's log reached the host through io.pyvm.log.0
        guest_log = sdir / "guest.log"
        lines = [json.loads(line) for line in guest_log.read_text().splitlines() if line.startswith("{")]
        assert any(rec.get("event") == "host connected" for rec in lines), guest_log.read_text()[-2000:]
