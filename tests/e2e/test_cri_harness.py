"""The CRI harness itself, proven with runc (the pyvm runtime_handler tests reuse it).

Set ``PYVM_RECORD_CRI_FIXTURE=1`` to re-record ``tests/fixtures/cri/*.json`` (the OCI specs CRI
generated for the pod sandbox and an app container), which the spec-rewrite unit tests read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.cri import CriContainerd, linux_resources, missing_prerequisites

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cri"
MiB = 1 << 20


@pytest.fixture
def harness(tmp_path: Path):
    missing = missing_prerequisites()
    if missing:
        pytest.skip(f"CRI harness needs: {', '.join(missing)}")
    h = CriContainerd(tmp_path)
    h.start()
    try:
        yield h
    finally:
        h.stop()
        assert h.leftovers() == [], h.leftovers()


def test_runc_pod_with_two_containers(harness: CriContainerd, tmp_path: Path) -> None:
    from cri_api.v1 import api_pb2 as cri

    client = harness.client
    assert client.version().runtime_name == "containerd"
    pod, pod_cfg = harness.run_pod("harness-pod")

    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "data").write_text("from the host\n")
    c1 = client.create_and_start(
        pod,
        harness.container_config(
            "c1",
            ["sh", "-c", "echo started; exec sleep 3600"],
            memory_limit=64 * MiB,
            env={"GREETING": "hello"},
            mounts=[cri.Mount(container_path="/data", host_path=str(volume), readonly=True)],
        ),
        pod_cfg,
    )
    c2 = client.create_and_start(pod, harness.container_config("c2", ["sleep", "3600"]), pod_cfg)

    running = {c.id: c.state for c in client.list_containers(pod)}
    assert running == {c1: cri.CONTAINER_RUNNING, c2: cri.CONTAINER_RUNNING}

    # ExecSync: output, stderr and exit code; env and the read-only volume arrived
    res = client.exec_sync(c1, ["sh", "-c", 'echo "$GREETING"; cat /data/data; echo oops >&2; exit 7'])
    assert (res.stdout, res.stderr, res.exit_code) == (b"hello\nfrom the host\n", b"oops\n", 7)
    assert client.exec_sync(c1, ["sh", "-c", "touch /data/x"]).exit_code != 0
    assert client.exec_sync(c2, ["true"]).exit_code == 0
    # both containers share the pod's network namespace with a CNI address on eth0
    addrs = [client.exec_sync(c, ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout for c in (c1, c2)]
    assert addrs[0] == addrs[1] and b"10.213." in addrs[0]

    stats = client.container_stats(c1)
    assert stats.memory.usage_bytes.value > 0
    assert stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0

    # UpdateContainerResources: the container's memory cgroup follows
    client.update_container_resources(c1, linux_resources(memory_limit=96 * MiB))
    limit = client.exec_sync(c1, ["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"])
    assert int(limit.stdout) == 96 * MiB

    if os.environ.get("PYVM_RECORD_CRI_FIXTURE"):
        _record_fixtures(harness, pod, c1)

    client.stop_container(c2, grace=2)
    client.remove_container(c2)
    assert [c.id for c in client.list_containers(pod)] == [c1]
    client.stop_pod_sandbox(pod)
    client.remove_pod_sandbox(pod)
    assert client.list_pod_sandbox() == []


def test_teardown_cleans_up_running_pods(tmp_path: Path) -> None:
    """A test that fails half way leaves running pods; stop() must still leave nothing behind."""
    missing = missing_prerequisites()
    if missing:
        pytest.skip(f"CRI harness needs: {', '.join(missing)}")
    h = CriContainerd(tmp_path)
    try:
        h.start()
        pod, cfg = h.run_pod("abandoned")
        h.client.create_and_start(pod, h.container_config("c", ["sleep", "3600"]), cfg)
        assert any(m.startswith(str(h.workdir)) for m in _mountpoints())
    finally:
        h.stop()
    assert h.leftovers() == []


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _record_fixtures(harness: CriContainerd, pod: str, container: str) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, info in (
        ("sandbox-spec.json", harness.client.pod_sandbox_status(pod, verbose=True).info["info"]),
        ("container-spec.json", harness.client.container_status(container, verbose=True).info["info"]),
    ):
        spec = json.loads(info)["runtimeSpec"]
        (FIXTURES / name).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
