"""The key ``ctr`` checks against containerd 1.7 (Debian trixie's package, unpacked by
``hack/fetch-containerd17.sh`` under /var/cache/pyvm/containerd-1.7) talking ttrpc to our shim.

containerd 1.7 differs from 1.6 for a shim in what it passes (``MAX_SHIM_VERSION``, ``GRPC_ADDRESS``,
``NAMESPACE`` in the environment), in its typeurl (v2, protobuf registry) and in its ttrpc version;
these checks show the same binary contract still holds. Both the daemon and ``ctr`` come from 1.7.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir
from tests.helpers.pyvm_vm import (
    RUNTIME,
    VENV_BIN,
    guest_kernel_release,
    qemu_pids,
    remove_leftovers,
    sandbox_leftovers,
    vm_skip_reason,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(600)]

CONTAINERD17_DIR = Path(os.environ.get("PYVM_CONTAINERD17_DIR", "/var/cache/pyvm/containerd-1.7"))
CONTAINERD17 = CONTAINERD17_DIR / "bin" / "containerd"
CTR17 = CONTAINERD17_DIR / "bin" / "ctr"


@pytest.fixture
def containerd17() -> Iterator[tuple[Containerd, Path, Path]]:
    reason = vm_skip_reason()
    if reason:
        pytest.skip(reason)
    if not (CONTAINERD17.exists() and CTR17.exists()):
        pytest.fail(f"{CONTAINERD17} missing: run hack/fetch-containerd17.sh (hack/setup.sh should)")
    version = subprocess.run([str(CONTAINERD17), "--version"], capture_output=True, text=True).stdout
    assert " 1.7." in version, version
    base = short_base_dir("pv")
    run_root = base / "r"
    run_root.mkdir()
    cfg = write_config(base / "pyvm.toml", default_memory=1024)
    c = Containerd(
        base / "ctrd",
        extra_path=[VENV_BIN],
        env={"PYVM_RUN_ROOT": str(run_root)},
        binary=str(CONTAINERD17),
        ctr_binary=str(CTR17),
    )
    try:
        with c:
            assert " 1.7." in c.ctr("version", check=True).stdout
            c.import_image(build_busybox_image(base / "bb.tar"))
            yield c, run_root, cfg
    finally:
        left = remove_leftovers(base, run_root)
        assert left == [], left


def test_ctr_run_exec_and_exit_codes_on_containerd17(containerd17: tuple[Containerd, Path, Path]) -> None:
    c, run_root, cfg = containerd17
    host_kernel = platform.release()
    rt = ["--runtime", RUNTIME, "--runtime-config-path", str(cfg)]

    # run --rm: output is the guest's kernel, the exit code propagates, nothing is left behind
    r = c.ctr("run", "--rm", *rt, BUSYBOX_REF, "once", "sh", "-c", "uname -r; exit 7", timeout=180)
    guest_kernel = r.stdout.strip()
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr, c.log_tail())
    assert guest_kernel and guest_kernel != host_kernel, (guest_kernel, host_kernel)
    assert guest_kernel == guest_kernel_release()
    # the shim answers Shutdown first and stops the VM right after: wait for it (bounded)
    wait_for(
        lambda: not sandbox_leftovers(run_root, "once", containerd_address=c.address, namespace="default"),
        30,
        "the once sandbox to be cleaned up",
    )

    # a detached task: exec output and exit codes, kill, delete
    c.ctr("run", "-d", *rt, BUSYBOX_REF, "d1", "sleep", "3600", check=True, timeout=180)
    r = c.ctr("tasks", "exec", "--exec-id", "e1", "d1", "uname", "-r", timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, guest_kernel), r
    r = c.ctr("tasks", "exec", "--exec-id", "e2", "d1", "sh", "-c", "echo err >&2; exit 3", timeout=60)
    assert (r.returncode, r.stderr) == (3, "err\n"), r
    assert len(qemu_pids(run_root, "d1")) == 1
    c.ctr("tasks", "kill", "-s", "SIGKILL", "d1", check=True)
    wait_for(lambda: "STOPPED" in c.ctr("tasks", "ls").stdout, 60, "d1 to stop after SIGKILL")
    c.ctr("tasks", "delete", "d1", check=True, timeout=60)
    c.ctr("containers", "delete", "d1", check=True)
    wait_for(
        lambda: not sandbox_leftovers(run_root, "d1", containerd_address=c.address, namespace="default"),
        30,
        "the d1 sandbox to be cleaned up",
    )
