"""The shim binary's CLI contract, run as a real process in a temp dir (no containerd, no root paths):
``start`` spawns the daemon and prints its address, pod grouping, ``delete`` cleanup, test seam guard,
logging to the bundle's ``log`` FIFO, Shutdown / SIGTERM exits that leave nothing behind."""

# ruff: noqa: ASYNC240, ASYNC221 -- tests block briefly on the filesystem and poll predicates

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from shim._pb.containerd.task.v2 import shim_pb2
from shim.api.bootstrap import UsageError, socket_path
from shim.cli.shim_main import parse
from shim.errors import AlreadyExists, FailedPrecondition
from shim.sandbox import persist
from shim.testing.fake_containerd import FakeContainerd
from shim.ttrpc import Client
from tests.helpers.pyvm_vm import write_config

SHIM = Path(sys.executable).with_name("containerd-shim-pyvm-v2")
T = "containerd.task.v2.Task"


def shim_argv() -> list[str]:
    return [str(SHIM)] if SHIM.exists() else [sys.executable, "-m", "shim.cli.shim_main"]


@dataclass
class Env:
    root: Path
    env: dict[str, str]

    @property
    def sockets(self) -> Path:
        return self.root / "s"

    @property
    def run_root(self) -> Path:
        return self.root / "run"

    def bundle(
        self, cid: str, annotations: dict[str, str] | None = None, args: list[str] | None = None
    ) -> Path:
        b = self.root / "bundles" / cid
        b.mkdir(parents=True)
        spec = {"process": {"args": args or ["sleep", "inf"]}, "annotations": annotations or {}}
        (b / "config.json").write_text(json.dumps(spec))
        return b

    def run(  # type: ignore[no-untyped-def]
        self,
        cid: str,
        action: str,
        bundle: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        namespace: str = "default",
    ):
        argv = [
            *shim_argv(),
            "-namespace",
            namespace,
            "-address",
            str(self.root / "containerd.sock"),
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            cid,
            *extra,
            action,
        ]
        return subprocess.run(
            argv, cwd=bundle, env=env or self.env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )


@pytest.fixture
def senv() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="pyvm-cli-", dir="/tmp"))
    env = dict(os.environ)
    env.update(
        PYVM_SHIM_SOCKET_DIR=str(root / "s"),
        PYVM_RUN_ROOT=str(root / "run"),
        TTRPC_ADDRESS=str(root / "containerd.sock.ttrpc"),
        PYVM_TEST_BACKEND="shim.testing.fake_backend:FakeBackend",
        PYVM_ENABLE_TEST_SEAMS="1",
    )
    env.pop("PYVM_SHIM_PROTOCOL", None)
    e = Env(root, env)
    try:
        yield e
    finally:
        # never leave a daemon behind, whatever the test did
        for state in (root / "run" / "sbs").glob("*/state.json"):
            rec = json.loads(state.read_text())
            if persist.process_start_time(rec["shim_pid"]) == rec["shim_start_time"]:
                os.kill(rec["shim_pid"], signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_parse_go_flag_forms() -> None:
    f = parse(["-namespace", "k8s.io", "--address=/a", "-id", "x", "-debug", "-bundle", "/b", "delete"])
    assert (f.namespace, f.address, f.id, f.debug, f.bundle, f.action) == (
        "k8s.io",
        "/a",
        "x",
        True,
        "/b",
        "delete",
    )
    assert parse(["-v"]).version and parse(["-version=true"]).version
    assert parse(["-id", "x"]).action == ""
    with pytest.raises(UsageError, match="not defined"):
        parse(["-bogus", "start"])
    with pytest.raises(UsageError, match="needs an argument"):
        parse(["-id"])


def test_socket_path_is_sha256_of_address_ns_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYVM_SHIM_SOCKET_DIR", raising=False)
    # value verified against containerd 1.6's runc shim (notes: containerd-shim-protocol.md 1.3)
    import hashlib

    expected = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/sb1").hexdigest()
    assert socket_path("/run/containerd/containerd.sock", "k8s.io", "sb1") == f"/run/containerd/s/{expected}"


def test_version_flag() -> None:
    out = subprocess.run([*shim_argv(), "-v"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Version:" in out.stdout


async def _client(address: str) -> Client:
    return await Client.connect_unix(address.removeprefix("unix://"), timeout=5)


async def _gone(pid: int, within: float = 10) -> bool:
    for _ in range(int(within / 0.05)):
        if persist.process_start_time(pid) is None:
            return True
        # our child? reap it (the daemon is re-parented to init normally; be safe anyway)
        await asyncio.sleep(0.05)
    return False


async def test_start_serve_lifecycle_shutdown_leaves_nothing(senv: Env) -> None:
    cd = FakeContainerd()
    await cd.serve(senv.env["TTRPC_ADDRESS"])
    b = senv.bundle("c1")
    os.mkfifo(b / "log")
    log_r = os.open(b / "log", os.O_RDONLY | os.O_NONBLOCK)  # containerd holds the log FIFO open
    try:
        r = await asyncio.to_thread(senv.run, "c1", "start", b)
        assert r.returncode == 0, r.stderr
        address = r.stdout.decode()
        assert r.stderr == b"" and "\n" not in address and address.startswith("unix://")
        path = address.removeprefix("unix://")
        assert (b / "address").read_text() == address
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(senv.sockets).st_mode) == 0o700
        client = await _client(address)
        await client.call(T, "Connect", shim_pb2.ConnectRequest(id="c1"), shim_pb2.ConnectResponse)
        rec = persist.load(persist.SandboxDir.for_sandbox("c1", senv.run_root / "sbs"))
        assert rec is not None and persist.daemon_alive(rec)
        await client.call(
            T, "Create", shim_pb2.CreateTaskRequest(id="c1", bundle=str(b)), shim_pb2.CreateTaskResponse
        )
        rec = persist.load(persist.SandboxDir.for_sandbox("c1", senv.run_root / "sbs"))
        assert rec is not None and list(rec.containers) == ["c1"]
        await client.call(T, "Start", shim_pb2.StartRequest(id="c1"), shim_pb2.StartResponse)
        await client.call(T, "Kill", shim_pb2.KillRequest(id="c1", signal=15), empty_pb2.Empty)
        w = await client.call(T, "Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse, timeout=5)
        assert w.exit_status == 143
        await client.call(T, "Delete", shim_pb2.DeleteRequest(id="c1"), shim_pb2.DeleteResponse)
        await client.call(T, "Shutdown", shim_pb2.ShutdownRequest(id="c1"), empty_pb2.Empty, timeout=3)
        await client.close()
        assert await _gone(rec.shim_pid), "daemon did not exit after Shutdown"
        assert not os.path.exists(path)
        assert not (senv.run_root / "sbs" / "c1").exists()
        assert cd.topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]

        logs = os.read(log_r, 1 << 20).decode().splitlines()
        records = [json.loads(line) for line in logs if line.startswith("{")]
        assert any(rec["event"] == "shim serving" and rec["shim_id"] == "c1" for rec in records)
        assert any(rec["event"] == "TEST backend" or "TEST backend" in rec["event"] for rec in records)

        d = await asyncio.to_thread(senv.run, "c1", "delete", b, "-bundle", str(b))
        assert d.returncode == 0, d.stderr
        resp = shim_pb2.DeleteResponse.FromString(d.stdout)
        assert resp.exit_status == 137 and resp.exited_at.seconds > 0
    finally:
        os.close(log_r)
        await cd.close()


async def test_pod_grouping_app_container_gets_the_sandbox_address(senv: Env) -> None:
    sb = senv.bundle(
        "sb1", {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb1"}
    )
    app = senv.bundle(
        "app1", {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb1"}
    )
    r1 = await asyncio.to_thread(senv.run, "sb1", "start", sb)
    r2 = await asyncio.to_thread(senv.run, "app1", "start", app)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr)
    assert r1.stdout == r2.stdout
    assert (app / "address").read_text() == r1.stdout.decode()
    assert len(list(senv.sockets.iterdir())) == 1
    client = await _client(r1.stdout.decode())
    for cid, b in (("sb1", sb), ("app1", app)):
        await client.call(
            T, "Create", shim_pb2.CreateTaskRequest(id=cid, bundle=str(b)), shim_pb2.CreateTaskResponse
        )
    rec = persist.load(persist.SandboxDir.for_sandbox("sb1", senv.run_root / "sbs"))
    assert rec is not None and sorted(rec.containers) == ["app1", "sb1"]
    # delete of the app container while the pod shim lives: only that container's part goes
    share = senv.run_root / "sbs" / "sb1" / "shared"
    (share / "app1").mkdir(parents=True)
    (share / "sb1").mkdir(parents=True)
    d = await asyncio.to_thread(senv.run, "app1", "delete", app, "-bundle", str(app))
    assert d.returncode == 0 and not (share / "app1").exists() and (share / "sb1").exists()
    assert (senv.run_root / "sbs" / "sb1" / "state.json").exists()
    # the sandbox's own delete with the daemon alive leaves the live sandbox alone
    d = await asyncio.to_thread(senv.run, "sb1", "delete", sb, "-bundle", str(sb))
    assert d.returncode == 0 and (senv.run_root / "sbs" / "sb1" / "state.json").exists()
    await client.close()


async def test_delete_after_sigkilled_daemon_cleans_the_whole_sandbox(senv: Env) -> None:
    b = senv.bundle("c9")
    r = await asyncio.to_thread(senv.run, "c9", "start", b)
    address = r.stdout.decode()
    client = await _client(address)
    await client.call(
        T, "Create", shim_pb2.CreateTaskRequest(id="c9", bundle=str(b)), shim_pb2.CreateTaskResponse
    )
    await client.close()
    sdir = persist.SandboxDir.for_sandbox("c9", senv.run_root / "sbs")
    rec = persist.load(sdir)
    assert rec is not None
    (sdir.share / "c9").mkdir(parents=True)
    os.kill(rec.shim_pid, signal.SIGKILL)
    assert await _gone(rec.shim_pid)
    assert os.path.exists(address.removeprefix("unix://")), "a SIGKILLed shim leaves its socket"
    for _ in range(2):  # idempotent
        d = await asyncio.to_thread(senv.run, "c9", "delete", b, "-bundle", str(b))
        assert d.returncode == 0, d.stderr
        assert shim_pb2.DeleteResponse.FromString(d.stdout).exit_status == 137
    assert not sdir.root.exists()
    assert not os.path.exists(address.removeprefix("unix://"))


async def test_same_id_in_another_namespace_is_refused_and_its_delete_leaves_the_owner_alone(
    senv: Env,
) -> None:
    """Sandbox dirs are keyed by id only: a second namespace must not share (and later clean) it."""
    b = senv.bundle("dup")
    r = await asyncio.to_thread(senv.run, "dup", "start", b)
    assert r.returncode == 0, r.stderr
    client = await _client(r.stdout.decode())
    await client.call(T, "Connect", shim_pb2.ConnectRequest(id="dup"), shim_pb2.ConnectResponse)
    await client.close()
    sdir = persist.SandboxDir.for_sandbox("dup", senv.run_root / "sbs")
    (sdir.share / "dup").mkdir(parents=True)
    rec = persist.load(sdir)
    assert rec is not None and rec.namespace == "default" and persist.daemon_alive(rec)

    b2 = senv.root / "bundles2" / "dup"
    b2.mkdir(parents=True)
    (b2 / "config.json").write_text((b / "config.json").read_text())
    r2 = await asyncio.to_thread(senv.run, "dup", "start", b2, namespace="other")
    assert r2.returncode == 1
    err = r2.stderr.decode()
    assert "AlreadyExists" in err and "namespace 'default'" in err and "dup" in err, err
    assert len(list(senv.sockets.iterdir())) == 1  # no second shim

    # containerd cleans up the failed start with delete: the owner's sandbox stays untouched
    d = await asyncio.to_thread(senv.run, "dup", "delete", b2, "-bundle", str(b2), namespace="other")
    assert d.returncode == 0, d.stderr
    assert b"left alone" in d.stderr
    assert (sdir.share / "dup").is_dir() and persist.load(sdir) == rec

    # a daemon racing past start is refused by claim, before it writes anything
    other = persist.SandboxRecord("dup", "other", "unix:///x", str(b2), os.getpid(), 0)
    with pytest.raises(AlreadyExists, match="namespace 'default'"):
        persist.claim(sdir, other)
    assert persist.load(sdir) == rec
    os.kill(rec.shim_pid, signal.SIGKILL)
    assert await _gone(rec.shim_pid)
    persist.claim(sdir, other)  # a dead owner's directory may be taken over
    assert persist.load(sdir) == other


async def test_start_replaces_a_stale_socket(senv: Env) -> None:
    import socket as so

    b = senv.bundle("c2")
    path = socket_path_for(senv, "c2")
    senv.sockets.mkdir(mode=0o700, parents=True)
    s = so.socket(so.AF_UNIX)
    s.bind(path)
    s.close()  # bound, never listening: a dead shim's leftover
    r = await asyncio.to_thread(senv.run, "c2", "start", b)
    assert r.returncode == 0, r.stderr
    client = await _client(r.stdout.decode())
    resp = await client.call(T, "Connect", shim_pb2.ConnectRequest(id="c2"), shim_pb2.ConnectResponse)
    await client.close()
    os.kill(resp.shim_pid, signal.SIGTERM)
    assert await _gone(resp.shim_pid)
    assert not os.path.exists(path) and not (senv.run_root / "sbs" / "c2").exists()


def socket_path_for(senv: Env, cid: str) -> str:
    old = os.environ.get("PYVM_SHIM_SOCKET_DIR")
    os.environ["PYVM_SHIM_SOCKET_DIR"] = str(senv.sockets)
    try:
        return socket_path(str(senv.root / "containerd.sock"), "default", cid)
    finally:
        if old is None:
            del os.environ["PYVM_SHIM_SOCKET_DIR"]
        else:
            os.environ["PYVM_SHIM_SOCKET_DIR"] = old


async def test_real_backend_without_guest_image_answers_failed_precondition(senv: Env) -> None:
    env = {k: v for k, v in senv.env.items() if k not in ("PYVM_TEST_BACKEND", "PYVM_ENABLE_TEST_SEAMS")}
    # no guest image: the VM backend refuses Create, naming the fix, before booting anything
    # (its own config: /etc/pyvm/configuration.toml may exist on this host and name a real guest)
    no_guest = senv.root / "no-guest"
    cfg = write_config(senv.root / "no-guest.toml")  # built-in defaults: the guest under PYVM_GUEST_ROOT
    env |= {"PYVM_GUEST_ROOT": str(no_guest), "PYVM_CONFIG": str(cfg)}
    b = senv.bundle("c3")
    r = await asyncio.to_thread(senv.run, "c3", "start", b, env=env)
    assert r.returncode == 0, r.stderr
    client = await _client(r.stdout.decode())
    with pytest.raises(FailedPrecondition, match="pyvm guest build"):
        await client.call(
            T, "Create", shim_pb2.CreateTaskRequest(id="c3", bundle=str(b)), shim_pb2.CreateTaskResponse
        )
    pid = (
        await client.call(T, "Connect", shim_pb2.ConnectRequest(id="c3"), shim_pb2.ConnectResponse)
    ).shim_pid
    await client.call(T, "Shutdown", shim_pb2.ShutdownRequest(id="c3"), empty_pb2.Empty)
    await client.close()
    assert await _gone(pid)


async def test_test_seam_is_refused_without_its_guard(senv: Env) -> None:
    env = dict(senv.env)
    del env["PYVM_ENABLE_TEST_SEAMS"]
    r = await asyncio.to_thread(senv.run, "c4", "start", senv.bundle("c4"), env=env)
    assert r.returncode == 1
    assert b"test seam" in r.stderr and r.stdout == b""
    assert not senv.sockets.exists() or not list(senv.sockets.iterdir())


async def test_start_without_id_fails_with_one_line(senv: Env) -> None:
    r = subprocess.run(
        [*shim_argv(), "-namespace", "x", "start"], capture_output=True, timeout=30, cwd=senv.root
    )
    assert r.returncode == 1 and r.stdout == b"" and r.stderr.count(b"\n") == 1


async def test_grpc_protocol_knob_prints_bootstrap_json(senv: Env) -> None:
    import grpc

    env = dict(senv.env, PYVM_SHIM_PROTOCOL="grpc")
    b = senv.bundle("g1")
    r = await asyncio.to_thread(senv.run, "g1", "start", b, env=env)
    assert r.returncode == 0, r.stderr
    boot = json.loads(r.stdout)
    assert boot["version"] == 3 and boot["protocol"] == "grpc" and boot["address"].startswith("unix://")
    path = boot["address"].removeprefix("unix://")
    async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
        connect = ch.unary_unary(
            "/containerd.task.v3.Task/Connect",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=shim_pb2.ConnectResponse.FromString,
        )
        pid = (await connect(shim_pb2.ConnectRequest(id="g1"), timeout=5)).shim_pid
        shutdown = ch.unary_unary(
            "/containerd.task.v3.Task/Shutdown",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=empty_pb2.Empty.FromString,
        )
        await shutdown(shim_pb2.ShutdownRequest(id="g1"), timeout=5)
    assert await _gone(pid)
    assert not os.path.exists(path)
