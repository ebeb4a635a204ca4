"""The guest agent on the host (as root) with real crun, over a unix socket, through the real client.

Fast proof of the agent without a VM. Needs root, crun and /bin/busybox. The host's cgroups (v2, or
v1/hybrid here) hold the test containers under a test-specific parent that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.agentclient import AgentClient, Stdio, wait_ready
from shim.errors import AlreadyExists, InvalidArgument, NotFound

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "/bin/busybox"


DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]


def build_busybox_rootfs(dest: Path) -> Path:
    """A minimal rootfs: /bin/busybox with its applets as symlinks, plus empty mount points."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    subprocess.run(["chroot", str(dest), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return dest


def process(args: list[str], *, terminal: bool = False, env: list[str] | None = None) -> dict[str, Any]:
    caps = list(DEFAULT_CAPS)
    return {
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": env or ["PATH=/bin", "TERM=xterm", "HOME=/root"],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": True,
    }


def spec(
    rootfs: Path, args: list[str], *, terminal: bool = False, memory_limit: int | None = None
) -> dict[str, Any]:
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit is not None:
        resources["memory"] = {"limit": memory_limit}
    return {
        "ociVersion": "1.0.2",
        "process": process(args, terminal=terminal),
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "pyvm-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=65536k"]},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "ro"],
            },
        ],
        "linux": {
            "resources": resources,
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


async def read_all(client: AgentClient, cid: str, exec_id: str = "", which: str = "stdout") -> bytes:
    read = client.read_stdout if which == "stdout" else client.read_stderr
    out = bytearray()
    while True:
        chunk = await read(cid, exec_id, 1024 * 1024)
        if chunk.eof:
            return bytes(out)
        out += chunk.data


async def run_to_exit(client: AgentClient, cid: str, exec_id: str = "") -> tuple[bytes, bytes, int]:
    out, err, ex = await asyncio.gather(
        read_all(client, cid, exec_id, "stdout"),
        read_all(client, cid, exec_id, "stderr"),
        client.wait_process(cid, exec_id),
    )
    return out, err, ex.exit_status


def cgroup_dirs(name: str) -> list[Path]:
    """Every directory a test cgroup parent ``name`` may have, v1 controllers and unified."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root / name]
    return [p / name for p in root.iterdir() if p.is_dir() and not p.is_symlink()]


def remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        os.rmdir(sub)
    os.rmdir(path)


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the agent runs crun, which needs root"),
    pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed"),
    pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="busybox-static is not installed"),
]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("rootfs"))


class AgentProcess:
    def __init__(self, tmp: Path, extra: list[str] | None = None) -> None:
        self.tmp = tmp
        self.sock = tmp / "agent.sock"
        self.cgroup_parent = f"pyvm-test-{uuid.uuid4().hex[:8]}"
        self.log = open(tmp / "agent.log", "wb")
        self.argv = [
            sys.executable,
            "-m",
            "shim.guestagent",
            "--containers-root",
            str(tmp / "containers"),
            "--crun-root",
            str(tmp / "crun"),
            "--cgroup-parent",
            f"/{self.cgroup_parent}",
            "--exit-io-grace",
            "1",
            *(extra or ["--listen", f"unix:{self.sock}"]),
        ]
        argv = self.argv
        if os.path.ismount("/sys/fs/cgroup/unified"):
            # hybrid cgroups (v1 controllers + an empty v2 mount): crun refuses them ("cgroups in
            # hybrid mode not supported"); without the unified mount, in a private mount
            # namespace, crun uses plain v1 and so does the agent.
            argv = ["unshare", "-m", "sh", "-c", 'umount /sys/fs/cgroup/unified && exec "$@"', "sh", *argv]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stderr=self.log, stdout=self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        for d in cgroup_dirs(self.cgroup_parent):
            remove_cgroup_tree(d)

    def log_text(self) -> str:
        return (self.tmp / "agent.log").read_text(errors="replace")


@pytest.fixture
def agent_proc(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path)
    try:
        yield a
    finally:
        a.stop()
    assert a.proc.returncode == 0, a.log_text()[-4000:]
    assert not list((tmp_path / "containers").glob("*")), "containers left behind"


@pytest.fixture
async def client(agent_proc: AgentProcess) -> AsyncIterator[AgentClient]:
    c = await wait_ready(agent_proc.sock, deadline=time.monotonic() + 30)
    try:
        yield c
    finally:
        await c.close()


def cid() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


async def test_health_version_details(client: AgentClient) -> None:
    assert await client.check()
    v = await client.version()
    assert v.protocol_version == 1 and v.crun_version.startswith("crun version")
    d = await client.guest_details()
    assert d.kernel_release == os.uname().release
    assert d.mem_total > 0 and d.cgroup_version in (1, 2)
    assert len(d.boot_id) == 36
    m = await client.mem_info()
    assert m.mem_total == d.mem_total


async def test_streams_byte_exact_and_exit_code(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    pid = await client.create_container(
        c, spec(rootfs, ["sh", "-c", "echo out; echo err >&2; exit 3"]), Stdio(stdout=True, stderr=True)
    )
    assert pid > 0
    assert await client.start_container(c) == pid
    out, err, status = await run_to_exit(client, c)
    assert (out, err, status) == (b"out\n", b"err\n", 3)
    # reads after EOF keep saying EOF; Wait can be asked again
    assert (await client.read_stdout(c)).eof
    assert (await client.wait_process(c)).exit_status == 3
    await client.remove_container(c)
    with pytest.raises(NotFound):
        await client.wait_process(c)


async def test_10mib_through_stdin_cat(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    data = os.urandom(10 * 1024 * 1024)
    await client.create_container(c, spec(rootfs, ["cat"]), Stdio(stdin=True, stdout=True, stderr=True))
    await client.start_container(c)

    async def feed() -> None:
        assert await client.write_stdin(c, "", data) == len(data)
        await client.close_stdin(c)

    _, out, err, ex = await asyncio.gather(
        feed(), read_all(client, c), read_all(client, c, which="stderr"), client.wait_process(c)
    )
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    assert err == b"" and ex.exit_status == 0
    await client.remove_container(c)


async def test_exec_second_process_and_signals(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    await client.create_container(c, spec(rootfs, ["sleep", "1000"]), Stdio())
    await client.start_container(c)
    # a second process in the same container: sees the init in its pid namespace
    await client.exec_process(
        c, "ps", process(["sh", "-c", "echo hi from exec; cat /proc/1/cmdline"]), Stdio()
    )
    out, err, status = await run_to_exit(client, c, "ps")
    assert (out, err, status) == (b"hi from exec\nsleep\x001000\x00", b"", 0)
    with pytest.raises(AlreadyExists):
        await client.exec_process(c, "ps", process(["true"]), Stdio())

    await client.exec_process(c, "term", process(["sleep", "1000"]), Stdio())
    procs = await client.list_processes(c)
    assert {p.exec_id for p in procs} >= {"term"} and any(p.is_init for p in procs)
    await client.signal_process(c, "term", signal.SIGTERM)
    assert (await client.wait_process(c, "term")).exit_status == 143
    with pytest.raises(NotFound):
        await client.signal_process(c, "term", signal.SIGTERM)

    await client.signal_process(c, "", signal.SIGKILL)
    ex = await client.wait_process(c)
    assert ex.exit_status == 137 and not ex.oom_killed
    await client.remove_container(c)


async def test_kill_created_container_releases_wait(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    await client.create_container(c, spec(rootfs, ["sleep", "1000"]), Stdio())
    await client.signal_process(c, "", signal.SIGKILL)
    assert (await client.wait_process(c)).exit_status == 137
    await client.remove_container(c)


async def test_oom_event(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    # dd allocates a 64 MiB buffer and touches it; the limit is 16 MiB
    await client.create_container(
        c,
        spec(rootfs, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"], memory_limit=16 << 20),
        Stdio(),
    )
    oom = asyncio.create_task(client.get_oom_event())
    await client.start_container(c)
    _out, _err, status = await run_to_exit(client, c)
    assert status == 137
    async with asyncio.timeout(10):
        assert await oom == c
    assert (await client.wait_process(c)).oom_killed
    st = await client.stats_container(c)
    assert st.memory.oom_kill >= 1 and st.memory.limit == 16 << 20
    await client.remove_container(c)


async def test_stats_update_pause_resume(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    await client.create_container(c, spec(rootfs, ["sleep", "1000"]), Stdio())
    await client.start_container(c)
    st = await client.stats_container(c)
    assert st.pids.current >= 1 and st.memory.usage > 0 and st.cpu.usage_usec >= 0
    await client.update_container(c, {"memory": {"limit": 64 << 20}})
    assert (await client.stats_container(c)).memory.limit == 64 << 20
    await client.pause_container(c)
    await client.resume_container(c)
    await client.remove_container(c)  # deletes a running container (crun delete --force)


async def test_terminal_process(client: AgentClient, rootfs: Path) -> None:
    c = cid()
    await client.create_container(
        c, spec(rootfs, ["sh", "-c", "stty size; tty; exit 5"], terminal=True), Stdio(stdin=True)
    )
    await client.resize_tty(c, "", 33, 101)
    await client.start_container(c)
    out, err, status = await run_to_exit(client, c)
    assert status == 5 and err == b""
    assert out.replace(b"\r\n", b"\n") == b"33 101\n/dev/console\n" or b"33 101" in out, out
    await client.remove_container(c)


async def test_bad_input_keeps_agent_serving(client: AgentClient, rootfs: Path) -> None:
    with pytest.raises(InvalidArgument):
        await client.create_container("bad-json", b"{not json", Stdio())
    with pytest.raises(InvalidArgument):
        await client.create_container("no-args", {"process": {}, "root": {"path": str(rootfs)}}, Stdio())
    with pytest.raises(InvalidArgument):
        await client.create_container("no-root", {"process": {"args": ["true"]}, "root": {}}, Stdio())
    with pytest.raises(InvalidArgument):
        await client.ttrpc.call(
            "pyvm.agent.v1.AgentService",
            "WaitProcess",
            __import__("shim._pb.pyvm.agent.v1.agent_pb2", fromlist=["x"]).WaitProcessRequest(
                container_id="../x"
            ),
            __import__("google.protobuf.empty_pb2", fromlist=["x"]).Empty,
            timeout=5,
        )
    for call in (
        client.wait_process("nope"),
        client.read_stdout("nope"),
        client.signal_process("nope", "", 9),
        client.remove_container("nope"),
        client.stats_container("nope"),
    ):
        with pytest.raises(NotFound):
            await call
    c = cid()
    await client.create_container(c, spec(rootfs, ["true"]), Stdio())
    with pytest.raises(NotFound):
        await client.wait_process(c, "no-such-exec")
    with pytest.raises(InvalidArgument):
        await client.signal_process(c, "", 1000)
    await client.remove_container(c)
    assert await client.check()


async def test_crun_failure_is_reported(client: AgentClient, rootfs: Path) -> None:
    from shim.errors import FailedPrecondition

    c = cid()
    with pytest.raises(FailedPrecondition, match=r"crun failed: .*/no/such/binary"):
        await client.create_container(c, spec(rootfs, ["/no/such/binary"]), Stdio())
    with pytest.raises(NotFound):  # a failed create leaves nothing behind
        await client.remove_container(c)
    await client.create_container(c, spec(rootfs, ["true"]), Stdio())  # the id is free again
    await client.remove_container(c)
    assert await client.check()


async def test_oversized_message_rejected(client: AgentClient) -> None:
    from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
    from shim.errors import ResourceExhausted

    big = pb.WriteStdinRequest(container_id="x", data=b"\0" * (5 * 1024 * 1024))
    with pytest.raises(ResourceExhausted):
        await client.ttrpc.call(
            "pyvm.agent.v1.AgentService", "WriteStdin", big, pb.WriteStdinResponse, timeout=5
        )
    assert await client.check()


async def test_disconnect_and_reconnect(agent_proc: AgentProcess, rootfs: Path) -> None:
    c = cid()
    first = await wait_ready(agent_proc.sock, deadline=time.monotonic() + 30)
    await first.create_container(c, spec(rootfs, ["sh", "-c", "read x; echo got $x"]), Stdio(stdin=True))
    await first.start_container(c)
    pending = asyncio.create_task(first.wait_process(c))
    await asyncio.sleep(0.1)
    await first.close()  # the host goes away with a long poll in flight
    with pytest.raises(Exception):  # noqa: B017
        await pending
    second = await wait_ready(agent_proc.sock, deadline=time.monotonic() + 30)
    try:
        await second.write_stdin(c, "", b"hello\n")
        out, _err, status = await run_to_exit(second, c)
        assert (out, status) == (b"got hello\n", 0)
        await second.remove_container(c)
    finally:
        await second.close()


async def test_port_mode_reopens_after_eof(tmp_path: Path, rootfs: Path) -> None:
    """The virtio-serial loop, with a unix socket standing in for QEMU's chardev: the agent connects,
    serves, sees EOF when the host side closes, and reconnects for the next host.
    """
    from shim.agentclient import AgentClient as AC
    from shim.ttrpc import Client

    port = tmp_path / "port.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(port))
    listener.listen(4)
    listener.setblocking(False)
    a = AgentProcess(tmp_path, ["--port", str(port)])
    loop = asyncio.get_running_loop()
    try:
        for round_ in range(3):
            async with asyncio.timeout(30):
                conn, _ = await loop.sock_accept(listener)
            reader, writer = await asyncio.open_unix_connection(sock=conn)
            client = AC(Client.from_stream(reader, writer))
            assert await client.check(timeout=10), round_
            d = await client.guest_details()
            assert d.mem_total > 0
            await client.close()
    finally:
        listener.close()
        a.stop()
    assert a.proc.returncode == 0, a.log_text()[-3000:]
    assert a.log_text().count("host connected") >= 3


async def test_create_sandbox_time_and_entropy_leave_the_host_alone(client: AgentClient) -> None:
    """Not PID 1, the agent accepts the template fields (clock, entropy) but changes nothing."""
    from datetime import UTC, datetime, timedelta

    from shim._pb.pyvm.agent.v1 import agent_pb2 as pb

    future = datetime.now(UTC) + timedelta(hours=1)
    await client.create_sandbox(sandbox_id="sb", host_time=future, entropy=os.urandom(512))
    assert time.time() < future.timestamp() - 3000  # the host's clock did not move
    with pytest.raises(InvalidArgument, match="entropy is 513 bytes; at most 512"):
        await client.ttrpc.call(
            "pyvm.agent.v1.AgentService",
            "CreateSandbox",
            pb.CreateSandboxRequest(entropy=b"\0" * 513),
            __import__("google.protobuf.empty_pb2", fromlist=["x"]).Empty,
            timeout=5,
        )
    assert await client.check()


async def test_prepare_template_on_a_host(client: AgentClient) -> None:
    """No module list outside the guest image, no cache dropping outside the guest: still answers."""
    r = await client.prepare_template()
    assert (r.modules_listed, r.modules_loaded, r.failures, r.caches_dropped) == (0, 0, (), False)
    assert await client.prepare_template() == r


async def test_share_mount_failure_names_the_tag(tmp_path: Path) -> None:
    """An unknown virtio-fs tag is retried (EINVAL where the host has virtiofs) only for
    --share-wait; no virtiofs at all (ENODEV) fails at once. Either way the error names the tag."""
    from shim.errors import FailedPrecondition

    a = AgentProcess(tmp_path, ["--listen", f"unix:{tmp_path / 'agent.sock'}", "--share-wait", "0.5"])
    try:
        c = await wait_ready(a.sock, deadline=time.monotonic() + 30)
        try:
            start = time.monotonic()
            with pytest.raises(FailedPrecondition, match="no-such-pyvm-tag"):
                await c.create_sandbox(share_tag="no-such-pyvm-tag", share_mount_point=str(tmp_path / "mnt"))
            assert time.monotonic() - start < 10
        finally:
            await c.close()
    finally:
        a.stop()
    assert a.proc.returncode == 0, a.log_text()[-3000:]
