"""A pod's containers come and go the way kubelet drives them, all in the pod's one VM (containerd
1.6 CRI, ``cri_api`` v1 client): a container that runs to completion (exit code, reason, CRI log
lines) and its restart as attempt 1, one that the guest's OOM killer ends (reason OOMKilled), one
whose command does not exist (a clear error; the pod and its other containers keep running; nothing
of it is left), StopContainer's grace period (SIGTERM trapped, or SIGKILL when it is not), and a
clean removal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.cri import CriContainerd
from tests.helpers.pyvm_vm import (
    cri_vm_dirs,
    pyvm_cri,
    qemu_pids,
    remove_pod_and_check_clean,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

#: a container's own exit under TCG, and containerd seeing it
EXIT_TIMEOUT = 120.0
MiB = 1 << 20


@pytest.fixture
def cri_vm() -> Iterator[tuple[CriContainerd, Path]]:
    base, run_root = cri_vm_dirs("pl")
    cfg = write_config(base / "pyvm.toml", default_memory=1024)
    with pyvm_cri(base, cfg, run_root) as h:
        yield h, run_root


def _exited(h: CriContainerd, cid: str):  # type: ignore[no-untyped-def]
    from cri_api.v1 import api_pb2 as cri

    def check():  # type: ignore[no-untyped-def]
        st = h.client.container_status(cid).status
        return st if st.state == cri.CONTAINER_EXITED else None

    return wait_for(check, EXIT_TIMEOUT, f"container {cid[:12]} to exit", interval=0.3)


def _log_lines(pod_log_dir: str, name: str, attempt: int) -> list[tuple[str, str, str]]:
    """(stream, tag, content) of each line of a container's CRI log file."""
    text = (Path(pod_log_dir) / name / f"{attempt}.log").read_text()
    out = []
    for line in text.splitlines():
        _time, stream, tag, content = line.split(" ", 3)
        out.append((stream, tag, content))
    return out


def test_container_lifecycle_in_the_pods_vm(cri_vm: tuple[CriContainerd, Path]) -> None:
    h, run_root = cri_vm
    client = h.client
    pod, pod_cfg = h.run_pod("life-pod", runtime_handler="pyvm")
    log_dir = pod_cfg.log_directory

    # runs to completion: exit code, reason and times in ContainerStatus, output in the CRI log
    job = client.create_and_start(
        pod, h.container_config("job", ["sh", "-c", "echo hello; echo oops >&2; exit 3"]), pod_cfg
    )
    st = _exited(h, job)
    assert (st.exit_code, st.reason) == (3, "Error"), st
    # finished_at is the exit time the guest reported, on the host's clock: CRI's started_at is taken
    # after Start returned, so an instant exit may even come before it (with runc too)
    assert st.started_at > 0 and abs(st.finished_at - st.started_at) < 10 * 10**9, st
    assert abs(st.finished_at / 1e9 - time.time()) < 120, st
    lines = _log_lines(log_dir, "job", 0)
    assert ("stdout", "F", "hello") in lines and ("stderr", "F", "oops") in lines, lines

    # over its memory limit: the guest kernel's OOM killer ends it, and CRI says so
    hog_cfg = h.container_config(
        "hog", ["sh", "-c", "head -c 400m /dev/zero | tail"], memory_limit=64 * MiB
    )  # tail keeps the whole (newline-free) input in memory
    hog = client.create_and_start(pod, hog_cfg, pod_cfg)
    st = _exited(h, hog)
    assert (st.reason, st.exit_code) == ("OOMKilled", 137), st
    client.remove_container(hog)

    # kubelet's restart: remove it and create attempt 1, in the same VM
    client.remove_container(job)
    job1 = client.create_and_start(pod, h.container_config("job", ["sleep", "3600"], attempt=1), pod_cfg)
    sidecar_cfg = h.container_config(
        "sidecar", ["sh", "-c", "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 1; done"]
    )
    sidecar = client.create_and_start(pod, sidecar_cfg, pod_cfg)
    assert len(qemu_pids(run_root, pod)) == 1, qemu_pids(run_root, pod)
    assert len(qemu_pids(run_root)) == 1

    # a command that does not exist: a clear error, and the rest of the pod keeps running
    with pytest.raises(grpc.RpcError) as err:
        client.create_and_start(pod, h.container_config("bad", ["/no/such/binary"]), pod_cfg)
    print(f"\nmissing command -> {err.value.code().name}: {err.value.details()}")
    assert "/no/such/binary" in err.value.details(), err.value.details()
    assert client.exec_sync(job1, ["echo", "alive"]).stdout == b"alive\n"
    for c in client.list_containers(pod):  # as kubelet does with a container that failed to start
        if c.metadata.name == "bad":
            client.remove_container(c.id)
    assert {c.metadata.name for c in client.list_containers(pod)} == {"job", "sidecar"}

    # StopContainer: SIGTERM, and SIGKILL once the grace period is over
    t0 = time.monotonic()
    client.stop_container(sidecar, grace=30)
    took = time.monotonic() - t0
    st = client.container_status(sidecar).status
    assert st.exit_code == 0, st  # it trapped SIGTERM and left on its own
    assert took < 30, f"a container that handles SIGTERM must not wait for the grace period ({took:.1f}s)"
    assert ("stdout", "F", "bye") in _log_lines(log_dir, "sidecar", 0)

    t0 = time.monotonic()
    client.stop_container(job1, grace=2)  # sleep as pid 1 of its namespace ignores SIGTERM
    took = time.monotonic() - t0
    st = client.container_status(job1).status
    assert st.exit_code == 137, st
    assert took >= 2, took
    print(f"StopContainer: SIGTERM handled in its own time, SIGKILL after the 2 s grace ({took:.1f}s)")

    remove_pod_and_check_clean(h, run_root, pod)
