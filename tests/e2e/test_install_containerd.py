"""`pyvm install` against a REAL containerd: its CRI plugin loads the edited config and reports `pyvm`.

A private containerd (its own root, state and sockets under a temp dir) loads `containerd config
default` output after `pyvm install` edited it; the CRI Status RPC (verbose) returns the runtime table
CRI actually parsed. Running a pod with runtime_handler "pyvm" needs the VM runtime (later issue); this
test proves the registration containerd sees, not a pod.
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
