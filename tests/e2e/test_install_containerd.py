"""`pyvm install` against a REAL containerd: its CRI plugin loads the edited config and reports `pyvm`.

A private containerd (its own root, state and sockets under a temp dir) loads `containerd config
default` output after `pyvm install` edited it; the CRI Status RPC (verbose) returns the runtime table
CRI actually parsed. ``test_installed_config_runs_a_pyvm_pod`` goes further: the installed config runs
a CRI pod with runtime_handler "pyvm" in a VM (the CRI harness of ``tests/helpers/cri.py`` -- netns,
CNI, pause image -- started on that config; one VM boot).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

if shutil.which("containerd") is None or shutil.which("ctr") is None:
    pytest.skip("containerd/ctr not installed (hack/setup.sh installs them)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("containerd needs root", allow_module_level=True)

grpc = pytest.importorskip("grpc")
cri = pytest.importorskip("cri_api.v1.api_pb2")
cri_grpc = pytest.importorskip("cri_api.v1.api_pb2_grpc")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short path: unix socket paths are limited to 108 bytes
    d = Path(tempfile.mkdtemp(prefix="pyvm-e2e-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def private_config(workdir: Path, text: str) -> str:
    """``text`` with every host path (root, state, sockets, opt) moved under ``workdir``."""
    doc = tomlkit.parse(text)
    doc["root"] = str(workdir / "root")
    doc["state"] = str(workdir / "state")
    doc.setdefault("grpc", tomlkit.table())["address"] = str(workdir / "containerd.sock")
    plugins = doc.setdefault("plugins", tomlkit.table())
    plugins.setdefault("io.containerd.internal.v1.opt", tomlkit.table())["path"] = str(workdir / "opt")
    # these hosts lack CAP_SYS_RESOURCE (DESIGN.md, facts)
    plugins.setdefault("io.containerd.grpc.v1.cri", tomlkit.table())["restrict_oom_score_adj"] = True
    return tomlkit.dumps(doc)


@contextlib.contextmanager
def containerd(workdir: Path, config: Path) -> Iterator[Path]:
    """Run containerd on ``config``; always killed on exit. Yields its socket."""
    sock = workdir / "containerd.sock"
    log = (workdir / "containerd.log").open("ab")
    proc = subprocess.Popen(
        ["containerd", "--config", str(config), "--log-level", "debug"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"containerd exited {proc.returncode}: {_tail(workdir)}")
            if sock.exists() and _plugins(sock):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"containerd did not come up in 30 s: {_tail(workdir)}")
            time.sleep(0.2)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _plugins(sock: Path) -> str:
    res = subprocess.run(["ctr", "--address", str(sock), "plugins", "ls"], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else ""


def _tail(workdir: Path) -> str:
    with contextlib.suppress(OSError):
        return (workdir / "containerd.log").read_text()[-3000:]
    return ""


def cri_runtimes(sock: Path) -> dict:
    """The runtimes table as containerd's CRI plugin parsed it (Status verbose -> info["config"])."""
    lines = [ln.split() for ln in _plugins(sock).splitlines()]
    cri_rows = [
        row for row in lines if len(row) >= 4 and row[0] == "io.containerd.grpc.v1" and row[1] == "cri"
    ]
    assert cri_rows and cri_rows[0][-1] == "ok", f"CRI plugin did not load: {cri_rows} {_tail(sock.parent)}"
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        status = cri_grpc.RuntimeServiceStub(channel).Status(cri.StatusRequest(verbose=True), timeout=20)
    ready = {c.type: c.status for c in status.status.conditions}
    assert ready.get("RuntimeReady") is True
    return json.loads(status.info["config"])["containerd"]["runtimes"]


def pyvm(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shim.cli.pyvm", *map(str, argv)], capture_output=True, text=True, timeout=60
    )


def _default_config() -> str:
    return subprocess.run(
        ["containerd", "config", "default"], check=True, capture_output=True, text=True
    ).stdout


def test_install_on_containerd_config_default(workdir):
    config = workdir / "config.toml"
    pyvm_conf = workdir / "configuration.toml"
    pyvm_conf.write_text("")
    config.write_text(private_config(workdir, _default_config()))
    original = config.read_bytes()

    res = pyvm("install", "--containerd-config", config, "--config-path", pyvm_conf)
    assert res.returncode == 0, res.stderr
    assert "registered" in res.stdout
    installed = config.read_bytes()

    with containerd(workdir, config) as sock:
        runtimes = cri_runtimes(sock)
    assert set(runtimes) == {"runc", "pyvm"}
    assert runtimes["pyvm"]["runtimeType"] == "io.containerd.pyvm.v2"
    assert runtimes["pyvm"]["PodAnnotations"] == ["io.pyvm.*"]
    assert runtimes["pyvm"]["privileged_without_host_devices"] is True
    assert runtimes["pyvm"]["options"] == {"ConfigPath": str(pyvm_conf)}

    # twice changes nothing
    res = pyvm("install", "--containerd-config", config, "--config-path", pyvm_conf)
    assert res.returncode == 0, res.stderr
    assert "nothing changed" in res.stdout
    assert config.read_bytes() == installed

    # uninstall restores the original byte for byte, and containerd no longer knows pyvm
    res = pyvm("uninstall", "--containerd-config", config)
    assert res.returncode == 0, res.stderr
    assert config.read_bytes() == original
    assert not (workdir / "config.toml.pyvm-backup").exists()
    with containerd(workdir, config) as sock:
        assert set(cri_runtimes(sock)) == {"runc"}


def test_install_on_a_config_without_runtimes_keeps_cri_alive(workdir):
    """Regression: a lone [..runtimes.pyvm] makes containerd 1.6 drop runc and fail to load CRI."""
    config = workdir / "config.toml"
    pyvm_conf = workdir / "configuration.toml"
    pyvm_conf.write_text("")
    # Debian's shipped /etc/containerd/config.toml has this shape
    debian = (
        "version = 2\n\n[plugins]\n"
        '  [plugins."io.containerd.grpc.v1.cri"]\n'
        '    [plugins."io.containerd.grpc.v1.cri".cni]\n'
        '      bin_dir = "/usr/lib/cni"\n      conf_dir = "/etc/cni/net.d"\n'
    )
    config.write_text(private_config(workdir, debian))
    res = pyvm("install", "--containerd-config", config, "--config-path", pyvm_conf)
    assert res.returncode == 0, res.stderr
    with containerd(workdir, config) as sock:
        runtimes = cri_runtimes(sock)
    assert set(runtimes) == {"runc", "pyvm"}
    assert runtimes["runc"]["runtimeType"] == "io.containerd.runc.v2"


def _harness_config(h, pyvm_conf: Path) -> str:  # type: ignore[no-untyped-def]
    """``containerd config default``, moved into the CRI harness ``h`` (root, state, sockets, opt,
    CNI dirs, the pause image it imported, ``restrict_oom_score_adj``), then ``pyvm install``ed.

    Writes both files the test compares later: ``h.config_path`` (installed) and ``original.toml``
    (before install). Returns the installed text (the harness writes it again, unchanged).
    """
    from tests.helpers.cri import CNI_BIN_DIR, PAUSE_IMAGE

    doc = tomlkit.parse(private_config(h.workdir, _default_config()))
    doc["root"], doc["state"] = str(h.root), str(h.state)
    doc["grpc"]["address"] = str(h.socket)  # type: ignore[index]
    cri_t = doc["plugins"]["io.containerd.grpc.v1.cri"]  # type: ignore[index]
    cri_t["sandbox_image"] = PAUSE_IMAGE  # no registry here: the harness imports a local pause image
    cri_t["cni"]["bin_dir"] = str(CNI_BIN_DIR)
    cri_t["cni"]["conf_dir"] = str(h.cni_conf_dir)
    original = tomlkit.dumps(doc)
    (h.workdir / "original.toml").write_text(original)
    h.config_path.write_text(original)
    res = pyvm("install", "--containerd-config", h.config_path, "--config-path", pyvm_conf)
    assert res.returncode == 0, res.stderr
    assert "registered" in res.stdout
    return h.config_path.read_text()


def test_installed_config_runs_a_pyvm_pod():
    """Issue 7, done when: the config `pyvm install` wrote makes a real containerd's CRI run a pod
    with runtime_handler "pyvm" (one VM: sandbox + one container; ExecSync shows the guest kernel);
    Stop/Remove leave nothing; install twice changes nothing; uninstall restores the bytes."""
    from tests.helpers.containerd import short_base_dir
    from tests.helpers.cri import CriContainerd, missing_prerequisites
    from tests.helpers.pyvm_vm import (
        VENV_BIN,
        guest_kernel_release,
        host_boot_id,
        qemu_pids,
        remove_leftovers,
        sandbox_leftovers,
        vm_skip_reason,
        wait_for,
    )

    missing = missing_prerequisites()
    reason = vm_skip_reason()
    if missing or reason:
        pytest.skip(f"needs: {', '.join(missing) or reason}")
    guest_release = guest_kernel_release()
    # short: <run root>/sbs/<64-hex pod id>/virtiofsd.sock must fit a unix socket path
    workdir = short_base_dir("pi")
    run_root = workdir / "r"
    run_root.mkdir()
    pyvm_conf = workdir / "configuration.toml"
    pyvm_conf.write_text("")  # built-in defaults
    h = CriContainerd(
        workdir,
        shim_dirs=[VENV_BIN],
        env={"PYVM_RUN_ROOT": str(run_root)},
        config_factory=lambda h: _harness_config(h, pyvm_conf),
    )
    try:
        h.start()
        installed = h.config_path.read_bytes()
        pod, pod_cfg = h.run_pod("installed", runtime_handler="pyvm")
        cid = h.client.create_and_start(pod, h.container_config("c1", ["sleep", "3600"]), pod_cfg)
        assert len(qemu_pids(run_root, pod)) == 1
        res = h.client.exec_sync(cid, ["uname", "-r"])
        assert (res.exit_code, res.stdout.decode().strip()) == (0, guest_release), res
        boot_id = h.client.exec_sync(cid, ["cat", "/proc/sys/kernel/random/boot_id"]).stdout.decode()
        assert boot_id.strip() != host_boot_id()

        h.client.stop_container(cid)
        h.client.remove_container(cid)
        h.client.stop_pod_sandbox(pod)
        h.client.remove_pod_sandbox(pod)
        assert h.client.list_pod_sandbox() == []
        bundles = [h.state / "io.containerd.runtime.v2.task" / "k8s.io" / x for x in (pod, cid)]
        wait_for(
            lambda: (
                not sandbox_leftovers(
                    run_root, pod, containerd_address=str(h.socket), namespace="k8s.io", bundles=bundles
                )
            ),
            30,
            "the pod's VM, shim, mounts and dirs to be gone",
        )

        # twice changes nothing; uninstall restores the original byte for byte
        res = pyvm("install", "--containerd-config", h.config_path, "--config-path", pyvm_conf)
        assert res.returncode == 0, res.stderr
        assert "nothing changed" in res.stdout
        assert h.config_path.read_bytes() == installed
        res = pyvm("uninstall", "--containerd-config", h.config_path)
        assert res.returncode == 0, res.stderr
        assert h.config_path.read_bytes() == (h.workdir / "original.toml").read_bytes()
    finally:
        h.stop()
        left = h.leftovers() + remove_leftovers(workdir, run_root)
        assert left == [], left
