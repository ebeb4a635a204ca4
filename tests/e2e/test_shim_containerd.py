"""Our shim under a real containerd 1.6 (private instance under /tmp): the binary contract, events,
reconnect after a containerd restart, and cleanup that leaves nothing behind.

Two kinds of containerd instance:

- ``production``: the shim exactly as shipped (the VM backend), pointed at an empty guest image
  root so that Create answers FAILED_PRECONDITION naming the fix (``pyvm guest build``) before
  booting anything; we check that containerd got that answer over ttrpc, that our logs reached
  containerd's log through the ``log`` FIFO, and that cleanup is complete. (Booting real VMs is
  the end-to-end suite's job.)
- ``with_fake_backend``: the same binary with the explicit TEST SEAM
  ``PYVM_TEST_BACKEND=shim.testing.fake_backend:FakeBackend`` + ``PYVM_ENABLE_TEST_SEAMS=1`` in
  containerd's environment. Only the VM is faked (an in-memory process that runs until killed);
  start/serve/ttrpc/events/delete are the real code. This is how we show a shim *serving a task*
  survives a containerd restart and that our task events reach containerd.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.containerd import (
    BUSYBOX_REF,
    Containerd,
    build_busybox_image,
    short_base_dir,
)
from tests.helpers.pyvm_vm import FAKE_VM_ENV, RUNTIME, VENV_BIN, shim_skip_reason, write_config

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

SOCKET_DIR = Path("/run/containerd/s")


@pytest.fixture(scope="module")
def image_tar() -> Iterator[Path]:
    d = short_base_dir("pyvm-img-")
    try:
        yield build_busybox_image(d / "bb.tar")
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def _instance(image_tar: Path, *, fake: bool) -> Iterator[tuple[Containerd, Path]]:
    reason = shim_skip_reason()
    if reason:
        pytest.skip(reason)
    run_root = short_base_dir("pyvm-run-")
    # an empty guest image, with our own config naming it (/etc/pyvm may name the real guest)
    no_guest = run_root / "no-guest"
    cfg = write_config(run_root / "no-guest.toml")  # built-in defaults: the guest under PYVM_GUEST_ROOT
    env = {"PYVM_RUN_ROOT": str(run_root), "PYVM_GUEST_ROOT": str(no_guest), "PYVM_CONFIG": str(cfg)}
    if fake:
        env |= FAKE_VM_ENV
    c = Containerd(extra_path=[VENV_BIN], env=env)
    try:
        with c:
            c.import_image(image_tar)
            yield c, run_root
    finally:
        import shutil

        shutil.rmtree(run_root, ignore_errors=True)


@pytest.fixture
def production(image_tar: Path) -> Iterator[tuple[Containerd, Path]]:
    yield from _instance(image_tar, fake=False)


@pytest.fixture
def with_fake_backend(image_tar: Path) -> Iterator[tuple[Containerd, Path]]:
    yield from _instance(image_tar, fake=True)


def shim_socket(c: Containerd, cid: str, ns: str = "default") -> Path:
    return SOCKET_DIR / hashlib.sha256(f"{c.address}/{ns}/{cid}".encode()).hexdigest()


def wait_for(pred, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_nothing_left(c: Containerd, run_root: Path, cid: str) -> None:
    wait_for(lambda: not c.shim_pids(), what="our shim processes to exit")
    wait_for(lambda: not shim_socket(c, cid).exists(), what="the shim socket to be removed")
    assert not (run_root / "sbs" / cid).exists(), list((run_root / "sbs").iterdir())
    wait_for(lambda: not c.bundle_dir(cid).exists(), what="containerd to remove the bundle")


def test_create_reaches_our_shim_and_fails_with_our_message(production: tuple[Containerd, Path]) -> None:
    c, run_root = production
    r = c.ctr("run", "--runtime", RUNTIME, BUSYBOX_REF, "p1", "true", timeout=60)
    assert r.returncode != 0
    assert "pyvm guest build" in r.stderr, r.stderr
    # our JSON logs came through the bundle's log FIFO into containerd's log
    log = c.log_path.read_text(errors="replace")
    assert '"event": "shim serving"' in log or '"event":"shim serving"' in log, c.log_tail()
    assert "rpc error" in log and "FAILED_PRECONDITION" in log
    # after the failed create containerd called Delete, Shutdown and our `delete`: nothing is left
    c.ctr("containers", "delete", "p1", check=True)
    assert_nothing_left(c, run_root, "p1")
    # containerd runs our `delete` after every task's connection closes; it must have succeeded
    log = c.log_path.read_text(errors="replace")
    assert "cleaning up dead shim" in log
    assert "cleanup warnings" not in log, c.log_tail()
    bad = [ln for ln in log.splitlines() if "failed to delete" in ln and "level=debug" not in ln]
    assert not bad, bad  # (a debug "failed to delete task ... NotFound" after a failed Create is normal)


def test_our_publisher_reaches_containerds_real_events_socket(production: tuple[Containerd, Path]) -> None:
    from shim.api.events import EventPublisher
    from shim.service.events import TaskOOM

    c, _ = production
    events = c.ctr_popen("events")
    try:
        time.sleep(0.5)

        async def publish() -> EventPublisher:
            pub = EventPublisher(address=c.ttrpc_address, namespace="default", attempts=2, backoff=0.1)
            pub.start()
            pub.publish(TaskOOM("published-by-pyvm"))
            await pub.close(timeout=5)
            return pub

        pub = asyncio.run(publish())
        assert (pub.published, pub.failed) == (1, 0)
        time.sleep(0.5)
    finally:
        events.terminate()
        out, _ = events.communicate(timeout=10)
    assert "/tasks/oom" in out and "published-by-pyvm" in out, out


def test_task_events_reach_containerd_in_order(with_fake_backend: tuple[Containerd, Path]) -> None:
    c, run_root = with_fake_backend
    events = c.ctr_popen("events")
    try:
        time.sleep(0.5)
        c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_REF, "f1", "sleep", "600", check=True, timeout=60)
        c.ctr("tasks", "kill", "-s", "SIGKILL", "f1", check=True)
        wait_for(lambda: "STOPPED" in c.ctr("tasks", "ls").stdout, what="task f1 to stop")
        c.ctr("tasks", "delete", "f1", check=True)
        time.sleep(1.0)
    finally:
        events.terminate()
        out, _ = events.communicate(timeout=10)
    topics = [
        next(w for w in line.split() if w.startswith("/tasks/"))
        for line in out.splitlines()
        if " /tasks/" in line and '"f1"' in line
    ]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], out
    exit_line = next(line for line in out.splitlines() if "/tasks/exit" in line)
    assert '"exit_status":137' in exit_line.replace(" ", ""), exit_line
    c.ctr("containers", "delete", "f1", check=True)
    assert_nothing_left(c, run_root, "f1")


def test_reconnects_to_a_running_shim_after_containerd_restart(
    with_fake_backend: tuple[Containerd, Path],
) -> None:
    c, run_root = with_fake_backend
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_REF, "r1", "sleep", "600", check=True, timeout=60)
    shims = c.shim_pids()
    assert len(shims) == 1
    c.restart()
    assert c.shim_pids() == shims, "the shim must survive a containerd restart"
    ls = c.ctr("tasks", "ls", check=True).stdout
    assert "r1" in ls and "RUNNING" in ls, ls
    # still controllable through the new connection; our events go to the new containerd
    events = c.ctr_popen("events")
    try:
        time.sleep(0.5)
        c.ctr("tasks", "kill", "-s", "SIGTERM", "r1", check=True)
        wait_for(lambda: "STOPPED" in c.ctr("tasks", "ls").stdout, what="task r1 to stop")
        c.ctr("tasks", "delete", "r1", check=True)
        time.sleep(0.5)
    finally:
        events.terminate()
        out, _ = events.communicate(timeout=10)
    assert "/tasks/exit" in out and "/tasks/delete" in out, out
    c.ctr("containers", "delete", "r1", check=True)
    assert_nothing_left(c, run_root, "r1")


def test_sigkilled_shim_is_cleaned_up_by_delete(with_fake_backend: tuple[Containerd, Path]) -> None:
    c, run_root = with_fake_backend
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_REF, "k1", "sleep", "600", check=True, timeout=60)
    state = json.loads((run_root / "sbs" / "k1" / "state.json").read_text())
    assert list(state["containers"]) == ["k1"]
    os.kill(state["shim_pid"], signal.SIGKILL)
    # containerd sees the connection drop, runs our `delete`, and reports the task stopped
    wait_for(
        lambda: "STOPPED" in c.ctr("tasks", "ls").stdout or "k1" not in c.ctr("tasks", "ls").stdout,
        what="containerd to notice the dead shim",
    )
    wait_for(lambda: not (run_root / "sbs" / "k1").exists(), what="delete to remove the sandbox state")
    c.ctr("tasks", "delete", "k1", timeout=30)
    c.ctr("containers", "delete", "k1", check=True)
    assert_nothing_left(c, run_root, "k1")
    assert subprocess.run(["pgrep", "-f", "containerd-shim-pyvm-v2.*k1"], capture_output=True).returncode != 0
