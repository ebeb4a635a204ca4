"""Faults under a real containerd 1.6 with real VMs: a killed QEMU, a killed shim, a containerd restart.

Each test runs one pod of two containers in one VM, grouped the way CRI groups them (the app
container carries ``io.kubernetes.cri.container-type=container`` and ``io.kubernetes.cri.sandbox-id``,
passed with ``ctr run --annotation``), so "all its containers" means more than one.

- SIGKILL of QEMU: both containers exit with 137 (``ctr events`` shows two ``/tasks/exit``), the reason
  is in containerd's log (from the shim's log FIFO), and the pod is removable with nothing left.
- containerd restart: the pod keeps running, ``ctr task exec`` and ``ctr task kill`` work through the
  new containerd; then SIGKILL of the shim: containerd notices, runs our ``delete``, and the VM,
  virtiofsd, mounts, socket and directories are all gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir
from tests.helpers.pyvm_vm import (
    RUNTIME,
    VENV_BIN,
    host_boot_id,
    qemu_pids,
    remove_leftovers,
    sandbox_leftovers,
    vm_skip_reason,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(600)]

NS = "default"
SB = "sb"
APP = "app"


@pytest.fixture
def pyvm_containerd() -> Iterator[tuple[Containerd, Path, Path]]:
    """(containerd, run_root, pyvm config) with the busybox image imported; everything removed after."""
    reason = vm_skip_reason() or Containerd.available()
    if reason:
        pytest.skip(reason)
    base = short_base_dir("pv")
    run_root = base / "r"
    run_root.mkdir()
    cfg = write_config(base / "pyvm.toml", default_memory=1024)
    c = Containerd(base / "ctrd", extra_path=[VENV_BIN], env={"PYVM_RUN_ROOT": str(run_root)})
    try:
        with c:
            c.import_image(build_busybox_image(base / "bb.tar"))
            yield c, run_root, cfg
    finally:
        left = remove_leftovers(base, run_root)
        assert left == [], left


def _run_pod(c: Containerd, cfg: Path) -> None:
    """Sandbox container ``sb`` and app container ``app`` in the same VM."""
    common = ["run", "-d", "--runtime", RUNTIME, "--runtime-config-path", str(cfg)]
    c.ctr(*common, BUSYBOX_REF, SB, "sleep", "3600", check=True, timeout=180)
    c.ctr(
        *common,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        f"io.kubernetes.cri.sandbox-id={SB}",
        BUSYBOX_REF,
        APP,
        "sh",
        "-c",
        # pid 1 ignores SIGTERM without a handler: trap it, with an exit code only the trap gives
        "trap 'exit 42' TERM; while :; do sleep 1; done",
        check=True,
        timeout=120,
    )


def _task_status(c: Containerd) -> dict[str, str]:
    out = c.ctr("tasks", "ls").stdout.splitlines()[1:]
    return {ln.split()[0]: ln.split()[-1] for ln in out if ln.strip()}


def _events(c: Containerd) -> subprocess.Popen[str]:
    p = c.ctr_popen("events")
    time.sleep(0.5)  # subscribed before anything happens
    return p


def _stop_events(p: subprocess.Popen[str]) -> str:
    p.terminate()
    out, _ = p.communicate(timeout=10)
    return out


def _exits(events: str) -> dict[str, int]:
    """container id -> exit_status of the ``/tasks/exit`` events of init processes."""
    found = {}
    for line in events.splitlines():
        if "/tasks/exit" not in line:
            continue
        m = re.search(r"(\{.*\})\s*$", line)
        assert m, line
        ev = json.loads(m.group(1))
        if ev.get("id", ev["container_id"]) == ev["container_id"]:
            found[ev["container_id"]] = ev.get("exit_status", 0)
    return found


def _log_lines(c: Containerd, *needles: str) -> str:
    lines = c.log_path.read_text(errors="replace").splitlines()
    return "\n".join(ln[:600] for ln in lines if any(n in ln for n in needles))


def _shim_pid(run_root: Path) -> int:
    return int(json.loads((run_root / "sbs" / SB / "state.json").read_text())["shim_pid"])


def _assert_pod_gone(c: Containerd, run_root: Path, timeout: float = 30) -> None:
    bundles = [c.bundle_dir(SB), c.bundle_dir(APP)]
    deadline = time.monotonic() + timeout
    while True:
        left = sandbox_leftovers(run_root, SB, containerd_address=c.address, namespace=NS, bundles=bundles)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert left == [], left
    assert c.shim_pids() == []


def test_qemu_sigkill_exits_every_container_with_137(pyvm_containerd: tuple[Containerd, Path, Path]) -> None:
    c, run_root, cfg = pyvm_containerd
    _run_pod(c, cfg)
    assert _task_status(c) == {SB: "RUNNING", APP: "RUNNING"}
    [qemu] = qemu_pids(run_root, SB)
    events = _events(c)
    try:
        os.kill(qemu, signal.SIGKILL)
        wait_for(lambda: _task_status(c) == {SB: "STOPPED", APP: "STOPPED"}, 60, "both tasks to stop")
        time.sleep(1.0)
    finally:
        out = _stop_events(events)
    if _exits(out) != {SB: 137, APP: 137}:
        print(
            _log_lines(
                c, "VM died", "/tasks/exit", "disconnected", "dead shim", "process exited", "rpc error"
            )
        )
    assert _exits(out) == {SB: 137, APP: 137}, out
    log = c.log_path.read_text(errors="replace")
    assert "the sandbox VM died" in log, c.log_tail()
    # the pod is removable: task delete, container delete, nothing left
    for cid in (APP, SB):
        c.ctr("tasks", "delete", cid, check=True, timeout=60)
        c.ctr("containers", "delete", cid, check=True)
    _assert_pod_gone(c, run_root)


def test_containerd_restart_then_shim_sigkill(pyvm_containerd: tuple[Containerd, Path, Path]) -> None:
    c, run_root, cfg = pyvm_containerd
    _run_pod(c, cfg)
    shims = c.shim_pids()
    [qemu] = qemu_pids(run_root, SB)
    boot_id = c.ctr(
        "tasks", "exec", "--exec-id", "b0", SB, "cat", "/proc/sys/kernel/random/boot_id", check=True
    )
    assert boot_id.stdout.strip() != host_boot_id()

    c.restart()
    assert c.shim_pids() == shims, "the shim must survive a containerd restart"
    assert qemu_pids(run_root, SB) == [qemu], "the VM must survive a containerd restart"
    assert _task_status(c) == {SB: "RUNNING", APP: "RUNNING"}
    # controllable through the new containerd: exec (output + exit code) and kill
    r = c.ctr("tasks", "exec", "--exec-id", "b1", APP, "cat", "/proc/sys/kernel/random/boot_id", timeout=60)
    assert (r.returncode, r.stdout) == (0, boot_id.stdout), r
    r = c.ctr("tasks", "exec", "--exec-id", "x1", SB, "sh", "-c", "exit 5", timeout=60)
    assert r.returncode == 5, r
    events = _events(c)
    try:
        c.ctr("tasks", "kill", "-s", "SIGTERM", APP, check=True)
        wait_for(lambda: _task_status(c).get(APP) == "STOPPED", 60, "app to stop after SIGTERM")
        time.sleep(0.5)
    finally:
        out = _stop_events(events)
    assert _exits(out) == {APP: 42}, out
    c.ctr("tasks", "delete", APP, check=True, timeout=60)
    c.ctr("containers", "delete", APP, check=True)
    assert _task_status(c) == {SB: "RUNNING"}

    # SIGKILL the shim: containerd notices the dead connection and runs our `delete`
    os.kill(_shim_pid(run_root), signal.SIGKILL)
    wait_for(
        lambda: _task_status(c).get(SB, "STOPPED") == "STOPPED", 60, "containerd to notice the dead shim"
    )
    wait_for(lambda: not qemu_pids(run_root, SB), 30, "`delete` to kill the orphaned QEMU")
    c.ctr("tasks", "delete", SB, timeout=60)  # may already be gone
    c.ctr("containers", "delete", SB, check=True)
    _assert_pod_gone(c, run_root)
    log = c.log_path.read_text(errors="replace")
    assert "cleaning up dead shim" in log
