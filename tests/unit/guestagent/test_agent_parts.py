"""Unit tests of the guest agent's parts: no root, no crun, no VM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.guestagent import agent as agent_mod
from shim.guestagent import guest, transport
from shim.guestagent.cgroups import ContainerCgroup, cgroup_version
from shim.guestagent.reaper import Reaper, exit_status, run
from shim.guestagent.stdio import HIGH_WATER, OutputStream, StdinWriter


@pytest.mark.parametrize(
    ("code", "expected"),
    [("exit(0)", 0), ("exit(3)", 3), ("exit(255)", 255), ("kill(TERM)", 143), ("kill(KILL)", 137)],
)
def test_exit_status_like_a_linux_parent(code: str, expected: int) -> None:
    pid = os.fork()
    if pid == 0:
        if code.startswith("exit"):
            os._exit(int(code[5:-1]))
        os.kill(os.getpid(), signal.SIGTERM if "TERM" in code else signal.SIGKILL)
        os._exit(99)
    _, st = os.waitpid(pid, 0)
    assert exit_status(st)[0] == expected


async def test_reaper_spawn_and_adopt_unclaimed() -> None:
    reaper = Reaper()
    reaper.start()
    try:
        status, out = await run(reaper, ["sh", "-c", "echo hi; echo oops >&2; exit 7"])
        assert status == 7 and out == b"hi\noops\n"
        # a grandchild re-parented to us (we are not a subreaper here, so use a direct child whose
        # exit is reaped before anybody asks): the status is kept until adopted
        pid, _fut = reaper.spawn(["sh", "-c", "exit 4"])
        reaper._waiters.pop(pid)  # forget it, as if crun had started it
        for _ in range(200):
            await asyncio.sleep(0.01)
            if pid in reaper._unclaimed:
                break
        assert (await reaper.adopt(pid)).status == 4
        # a pid that never was ours and is gone: status 255, not a hang
        assert (await reaper.adopt(2**22 - 3)).status == 255
    finally:
        reaper.stop()


async def test_children_get_default_signal_dispositions() -> None:
    """Python ignores SIGPIPE; a container process must not inherit that."""
    reaper = Reaper()
    reaper.start()
    try:
        status, out = await run(reaper, ["sh", "-c", "grep SigIgn /proc/self/status"])
        assert status == 0
        ignored = int(out.split()[1], 16)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            assert not ignored & (1 << (sig - 1)), (sig, out)
    finally:
        reaper.stop()


async def test_output_stream_order_backpressure_and_eof() -> None:
    r, w = os.pipe()
    s = OutputStream(r, "stdout")
    payload = os.urandom(HIGH_WATER + 300_000)

    async def writer() -> None:
        os.set_blocking(w, False)
        view = memoryview(payload)
        loop = asyncio.get_running_loop()
        while view:
            try:
                n = os.write(w, view)
                view = view[n:]
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_writer(w, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_writer(w)
        os.close(w)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.2)
    assert not task.done(), "the writer must block once the buffer is at its high water mark"
    got = bytearray()
    while True:
        data, eof = await s.read(1 << 20)
        if eof:
            break
        assert data
        got += data
    await task
    assert bytes(got) == payload
    assert await s.read(10) == (b"", True)


async def test_output_stream_read_is_cancellation_safe() -> None:
    r, w = os.pipe()
    s = OutputStream(r, "stdout")
    t = asyncio.create_task(s.read(10))
    await asyncio.sleep(0.01)
    t.cancel()
    os.write(w, b"abc")
    os.close(w)
    assert await s.read(10) == (b"abc", False)
    assert await s.read(10) == (b"", True)


async def test_stdin_writer_close_gives_eof_and_refuses_more() -> None:
    r, w = os.pipe()
    sw = StdinWriter(w)
    assert await sw.write(b"x" * 1000) == 1000
    await sw.close()
    assert os.read(r, 2000) == b"x" * 1000 and os.read(r, 10) == b""
    with pytest.raises(Exception, match="closed"):
        await sw.write(b"y")
    os.close(r)


def _spec(root: Path, **over: object) -> bytes:
    s = {"process": {"args": ["sh"], "cwd": "/"}, "root": {"path": str(root)}}
    s.update(over)
    return json.dumps(s).encode()


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"[]", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"root": {"path": "/"}}', "process must be an object"),
        (b'{"process": {"args": ["sh"]}, "root": {"path": "rel"}}', "absolute"),
        (b'{"process": {"args": ["sh"], "cwd": "x"}, "root": {"path": "/"}}', "cwd"),
        (b'{"process": {"args": [1]}, "root": {"path": "/"}}', "args"),
        (b'{"process": {"args": ["a"], "env": "A=1"}, "root": {"path": "/"}}', "env"),
        (b'{"process": {"args": ["a"]}, "root": {"path": "/no/such/dir"}}', "not a directory"),
        (b'{"process": {"args": ["a"]}, "root": {"path": "/"}, "mounts": {}}', "mounts"),
    ],
)
def test_spec_validation(blob: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        agent_mod._validate_spec(agent_mod._parse_json_object(blob, "OCI spec"))


async def test_create_container_rejects_before_touching_anything(tmp_path: Path) -> None:
    a = agent_mod.Agent(Reaper(), agent_mod.Config(containers_root=tmp_path / "c", crun_binary="/bin/false"))
    for bad_id in ("", "../x", "a/b", "x" * 200):
        with pytest.raises(InvalidArgument):
            await a.create_container(bad_id, _spec(tmp_path), agent_mod.StdioRequest())
    with pytest.raises(InvalidArgument):
        await a.create_container("ok", b"nope", agent_mod.StdioRequest())
    assert not (tmp_path / "c").exists() and not a.containers


def test_cgroup_v2_stats_and_oom(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    d = tmp_path / "pyvm" / "c1"
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text("usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 0\n")
    (d / "memory.current").write_text("4096\n")
    (d / "memory.max").write_text("max\n")
    (d / "memory.stat").write_text("anon 1\nfile 2\ninactive_file 3\npgfault 4\npgmajfault 5\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    (d / "pids.current").write_text("3\n")
    (d / "pids.max").write_text("100\n")
    (d / "cgroup.procs").write_text("10\n11\n")
    assert cgroup_version(tmp_path) == 2
    cg = ContainerCgroup(2, {"": d})
    st = cg.stats()
    assert st.cpu["usage_usec"] == 100 and st.cpu["user_usec"] == 60
    assert st.memory["usage"] == 4096 and st.memory["limit"] == 0 and st.memory["inactive_file"] == 3
    assert st.memory["oom_kill"] == 2 and cg.oom_kills() == 2
    assert st.pids == {"current": 3, "limit": 100}
    assert cg.pids() == [10, 11]


def test_cgroup_of_pid_parses_proc(tmp_path: Path) -> None:
    cg = ContainerCgroup.of_pid(os.getpid(), root=tmp_path)
    # tmp_path is neither v1 nor v2: the v1 parser finds no known controller dirs or v2 path
    assert cg is None or cg.version in (1, 2)


def test_meminfo_and_online_memory(tmp_path: Path) -> None:
    (tmp_path / "block_size_bytes").write_text("8000000\n")
    for n, state in [(0, "online"), (32, "offline"), (33, "offline")]:
        (tmp_path / f"memory{n}").mkdir()
        (tmp_path / f"memory{n}" / "state").write_text(state)
    assert guest.memory_block_size(tmp_path) == 128 << 20
    r = asyncio.run(guest.online_memory(True, sysfs=tmp_path))
    assert r.blocks == ["memory32", "memory33"] and r.bytes_onlined == 256 << 20 and not r.failures
    assert (tmp_path / "memory32" / "state").read_text() == "online_movable"
    mi = guest.meminfo()
    assert mi["MemTotal"] > 0 and r.mem_total == mi["MemTotal"]


def test_online_memory_waits_for_blocks_to_appear(tmp_path: Path) -> None:
    (tmp_path / "block_size_bytes").write_text("8000000\n")

    async def scenario() -> guest.OnlineResult:
        async def hotplug() -> None:
            await asyncio.sleep(0.1)
            (tmp_path / "memory40").mkdir()
            (tmp_path / "memory40" / "state").write_text("offline")

        t = asyncio.create_task(hotplug())
        r = await guest.online_memory(False, wait_for_bytes=128 << 20, wait_ms=5000, sysfs=tmp_path)
        await t
        return r

    r = asyncio.run(scenario())
    assert r.blocks == ["memory40"]
    assert (tmp_path / "memory40" / "state").read_text() == "online"


def test_find_port_by_name(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for name, port in [("other", "vport0p1"), ("io.pyvm.agent.0", "vport0p2")]:
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    dev.mkdir()
    (dev / "vport0p2").touch()
    assert transport.find_port("io.pyvm.agent.0", sysfs, dev) == dev / "vport0p2"
    assert transport.find_port("io.pyvm.log.0", sysfs, dev) is None


def test_log_port_never_blocks(tmp_path: Path) -> None:
    """A full port (no host reading) drops lines instead of blocking the agent."""
    a, b = socket.socketpair()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    keep_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    lp = transport.LogPort(fifo)
    for _ in range(5000):
        lp.write("x" * 100 + "\n")  # 500 kB into a 64 kB pipe nobody reads
    os.close(keep_reader)
    a.close()
    b.close()


async def test_agent_main_serves_over_a_unix_socket(tmp_path: Path) -> None:
    """Smoke: the entry point starts, answers Health over --listen and stops cleanly on SIGTERM."""
    from shim.agentclient import wait_ready

    sock = tmp_path / "a.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shim.guestagent",
        "--listen",
        f"unix:{sock}",
        "--containers-root",
        str(tmp_path / "c"),
        "--crun-root",
        str(tmp_path / "crun"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        loop = asyncio.get_running_loop()
        c = await wait_ready(sock, deadline=loop.time() + 30)
        assert await c.check()
        await c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
    assert any(r.get("event") == "agent serving" for r in lines)
