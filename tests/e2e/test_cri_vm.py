"""CRI pods in pyvm VMs, driven the way kubelet drives containerd 1.6's CRI (``cri_api`` v1 client).

One pod per memory hot-plug mechanism (each its own private containerd, because the mechanism comes
from the pyvm configuration file handed over by the runtime's ``ConfigPath`` option):

- ``virtio-mem`` pod: everything — two containers in one VM (same guest boot_id, not the host's;
  exactly one QEMU for the pod), ExecSync output and exit codes, ContainerStats memory numbers,
  UpdateContainerResources growing guest MemTotal by >= 1 GiB and shrinking it again, an update above
  max memory refused with nothing changed, and StopPodSandbox + RemovePodSandbox leaving nothing.
- ``acpi`` (pc-dimm) pod: growth by >= 1 GiB and shrink (the agent onlines hot-added blocks
  movable, so the DIMM can be ejected), then clean teardown.

Timings (boot, hot-plug) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.cri import CriContainerd, linux_resources
from tests.helpers.pyvm_vm import (
    cri_vm_dirs,
    host_boot_id,
    meminfo_kib,
    pyvm_cri,
    qemu_pids,
    remove_pod_and_check_clean,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MEMORY_MIB = 1024
MAX_MEMORY_MIB = 4096
#: guest memory changes under TCG: generous, bounded
RESIZE_TIMEOUT = 90.0


@pytest.fixture
def cri_pyvm(request: pytest.FixtureRequest) -> Iterator[tuple[CriContainerd, Path]]:
    """A CRI containerd whose ``pyvm`` runtime uses the memory mechanism ``request.param``."""
    base, run_root = cri_vm_dirs("pv")
    cfg = write_config(
        base / "pyvm.toml",
        default_memory=DEFAULT_MEMORY_MIB,
        max_memory=MAX_MEMORY_MIB,
        memory_hotplug=request.param,
    )
    with pyvm_cri(base, cfg, run_root) as h:
        yield h, run_root


def _mem_total(h: CriContainerd, cid: str) -> int:
    res = h.client.exec_sync(cid, ["cat", "/proc/meminfo"])
    assert res.exit_code == 0, res
    return meminfo_kib(res.stdout.decode()) * 1024


def _cgroup_limit(h: CriContainerd, cid: str) -> int:
    """The container's memory limit as the guest kernel enforces it (cgroup v2: memory.max of the
    cgroup /proc/self/cgroup names, which is the container's: exec joins it)."""
    script = 'p=$(sed -n "s/^0:://p" /proc/self/cgroup); cat "/sys/fs/cgroup${p%/}/memory.max"'
    res = h.client.exec_sync(cid, ["sh", "-c", script])
    assert res.exit_code == 0, res
    return int(res.stdout.strip())


def _wait_mem(h: CriContainerd, cid: str, pred, what: str) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    last = [0]

    def check() -> bool:
        last[0] = _mem_total(h, cid)
        return bool(pred(last[0]))

    try:
        wait_for(check, RESIZE_TIMEOUT, what, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last MemTotal {last[0] // MiB} MiB") from None
    return last[0], time.monotonic() - t0


def _pod_with_two_containers(
    h: CriContainerd, name: str, share_pid: bool = False
) -> tuple[str, str, str, float]:
    t0 = time.monotonic()
    pod, pod_cfg = h.run_pod(name, runtime_handler="pyvm", share_pid=share_pid)
    boot = time.monotonic() - t0
    c1_cfg = h.container_config("c1", ["sleep", "3600"], memory_limit=256 * MiB, share_pid=share_pid)
    c1 = h.client.create_and_start(pod, c1_cfg, pod_cfg)
    c2_cfg = h.container_config("c2", ["sleep", "3601"], share_pid=share_pid)
    c2 = h.client.create_and_start(pod, c2_cfg, pod_cfg)
    return pod, c1, c2, boot


def _out(h: CriContainerd, cid: str, *argv: str) -> str:
    res = h.client.exec_sync(cid, list(argv))
    assert res.exit_code == 0, (argv, res)
    return res.stdout.decode().strip()


def _check_pod_namespaces(h: CriContainerd, pod_name: str, c1: str, c2: str, share_pid: bool) -> None:
    """As under runc: the pod's containers have the pod's hostname and share its IPC and UTS
    namespaces (the pause container's, in the guest); PID only with shareProcessNamespace."""
    for cid in (c1, c2):
        assert _out(h, cid, "hostname") == pod_name
    ns = {
        cid: {k: _out(h, cid, "readlink", f"/proc/self/ns/{k}") for k in ("ipc", "uts", "pid")}
        for cid in (c1, c2)
    }
    assert ns[c1]["ipc"] == ns[c2]["ipc"] and ns[c1]["uts"] == ns[c2]["uts"], ns
    # pid 1 of a shared pid namespace is the pod's pause process; otherwise each container's own
    init = {cid: _out(h, cid, "cat", "/proc/1/cmdline").replace("\x00", " ").strip() for cid in (c1, c2)}
    if share_pid:
        assert ns[c1]["pid"] == ns[c2]["pid"], ns
        assert init[c1] == init[c2] and "sleep 86400" in init[c1], init  # the test pause image's loop
        assert "sleep 3600" in _out(h, c2, "ps", "-o", "args"), "c2 must see c1's processes"
    else:
        assert ns[c1]["pid"] != ns[c2]["pid"], ns
        assert init == {c1: "sleep 3600", c2: "sleep 3601"}, init
        assert "sleep 3600" not in _out(h, c2, "ps", "-o", "args"), "c2 must not see c1's processes"


@pytest.mark.parametrize("cri_pyvm", ["virtio-mem"], indirect=True)
def test_pod_is_one_vm_and_memory_follows_updates(cri_pyvm: tuple[CriContainerd, Path]) -> None:
    from cri_api.v1 import api_pb2 as cri

    h, run_root = cri_pyvm
    client = h.client
    pod, c1, c2, boot = _pod_with_two_containers(h, "vm-pod", share_pid=True)
    print(f"\nRunPodSandbox (VM boot) {boot:.1f}s")
    _check_pod_namespaces(h, "vm-pod", c1, c2, share_pid=True)
    states = {c.id: c.state for c in client.list_containers(pod)}
    assert states == {c1: cri.CONTAINER_RUNNING, c2: cri.CONTAINER_RUNNING}

    # one VM: both containers see the same guest kernel instance, which is not the host's
    boot_ids = {
        c: client.exec_sync(c, ["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip() for c in (c1, c2)
    }
    assert boot_ids[c1] == boot_ids[c2] and len(boot_ids[c1]) == 36, boot_ids
    assert boot_ids[c1].decode() != host_boot_id()
    assert len(qemu_pids(run_root, pod)) == 1, qemu_pids(run_root, pod)
    assert len(qemu_pids(run_root)) == 1, "app containers must not get VMs of their own"
    assert sorted(p.name for p in (run_root / "sbs").iterdir()) == [pod]

    # ExecSync: stdout, stderr, exit codes
    res = client.exec_sync(c1, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
    assert client.exec_sync(c2, ["true"]).exit_code == 0
    assert client.exec_sync(c2, ["false"]).exit_code == 1

    # ContainerStats: memory numbers from the guest cgroup
    stats = client.container_stats(c1)
    assert stats.memory.usage_bytes.value > 0, stats
    assert stats.memory.working_set_bytes.value > 0, stats
    assert stats.attributes.id == c1

    # UpdateContainerResources +1 GiB -> the VM grows by >= 1 GiB
    before = _mem_total(h, c1)
    assert _cgroup_limit(h, c1) == 256 * MiB
    client.update_container_resources(c1, linux_resources(memory_limit=256 * MiB + GiB))
    grown, t_grow = _wait_mem(h, c1, lambda m: m >= before + GiB, "MemTotal to grow by 1 GiB")
    print(f"grow: MemTotal {before // MiB} -> {grown // MiB} MiB in {t_grow:.1f}s")
    assert _cgroup_limit(h, c1) == 256 * MiB + GiB

    # ... and lowering it gives the memory back (virtio-mem unplugs)
    client.update_container_resources(c1, linux_resources(memory_limit=256 * MiB))
    shrunk, t_shrink = _wait_mem(h, c1, lambda m: m <= grown - GiB, "MemTotal to shrink by 1 GiB")
    print(f"shrink: MemTotal {grown // MiB} -> {shrunk // MiB} MiB in {t_shrink:.1f}s")
    assert _cgroup_limit(h, c1) == 256 * MiB

    # above max memory: refused, nothing changed, the pod keeps working
    with pytest.raises(grpc.RpcError) as err:
        client.update_container_resources(c1, linux_resources(memory_limit=MAX_MEMORY_MIB * MiB))
    code, details = err.value.code(), err.value.details()
    print(f"update above max memory -> {code.name}: {details}")
    # containerd 1.6's errdefs has no ResourceExhausted: its client turns the shim's code into
    # Unknown on the way to CRI; the shim's message still says what happened.
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN), (code, details)
    assert "max" in details.lower() or "exhaust" in details.lower(), details
    assert _cgroup_limit(h, c1) == 256 * MiB
    assert abs(_mem_total(h, c1) - shrunk) < 64 * MiB
    assert client.exec_sync(c2, ["echo", "alive"]).stdout == b"alive\n"
    assert len(qemu_pids(run_root, pod)) == 1

    remove_pod_and_check_clean(h, run_root, pod)


@pytest.mark.parametrize("cri_pyvm", ["acpi"], indirect=True)
def test_pc_dimm_grow_and_shrink(cri_pyvm: tuple[CriContainerd, Path]) -> None:
    h, run_root = cri_pyvm
    client = h.client
    pod, c1, c2, boot = _pod_with_two_containers(h, "dimm-pod")
    print(f"\nRunPodSandbox (VM boot) {boot:.1f}s")
    _check_pod_namespaces(h, "dimm-pod", c1, c2, share_pid=False)
    before = _mem_total(h, c1)
    client.update_container_resources(c1, linux_resources(memory_limit=256 * MiB + GiB))
    grown, t_grow = _wait_mem(h, c1, lambda m: m >= before + GiB, "MemTotal to grow by 1 GiB (pc-dimm)")
    print(f"pc-dimm grow: MemTotal {before // MiB} -> {grown // MiB} MiB in {t_grow:.1f}s")
    assert _cgroup_limit(h, c1) == 256 * MiB + GiB

    client.update_container_resources(c1, linux_resources(memory_limit=256 * MiB))
    assert _cgroup_limit(h, c1) == 256 * MiB
    shrunk, t_shrink = _wait_mem(h, c1, lambda m: m <= grown - GiB, "MemTotal to shrink by 1 GiB (pc-dimm)")
    print(f"pc-dimm shrink: MemTotal {grown // MiB} -> {shrunk // MiB} MiB in {t_shrink:.1f}s")

    remove_pod_and_check_clean(h, run_root, pod)
