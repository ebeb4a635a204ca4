"""The agent client against a fake agent (a real ttrpc server with scripted handlers): dataclasses
out, untrusted answers rejected, deadlines scaled, long polls without one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import empty_pb2

from shim._pb.pyvm.agent.v1 import agent_pb2 as pb
from shim.agentclient import TIMEOUTS, AgentClient, ExitStatus, Output, Stdio, TemplatePrepared
from shim.agentclient.client import MAX_ENTROPY, MAX_IO_CHUNK, SANDBOX_ENTROPY, SHARE_WAIT
from shim.errors import GuestError, InvalidArgument, NotFound
from shim.ttrpc import Client, Method, Server

Handler = Callable[[Any, Any], Any]


class FakeAgent:
    def __init__(self) -> None:
        self.server = Server()
        self.calls: list[tuple[str, Any, float | None]] = []
        self.answers: dict[str, Any] = {}

    def add(self, service: str, name: str, req: type, resp: type) -> None:
        async def handler(request: Any, ctx: Any) -> Any:
            self.calls.append((name, request, ctx.timeout))
            a = self.answers.get(name, resp())
            if isinstance(a, Exception):
                raise a
            return a(request) if callable(a) else a

        self._methods.setdefault(service, {})[name] = Method(req, resp, handler)

    _methods: dict[str, dict[str, Method]]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAgent, AgentClient]]:
    f = FakeAgent()
    f._methods = {}
    svc = pb.DESCRIPTOR.services_by_name
    for sname, full in (("Health", "pyvm.agent.v1.Health"), ("AgentService", "pyvm.agent.v1.AgentService")):
        for m in svc[sname].methods:
            req = getattr(pb, m.input_type.name)
            resp = (
                empty_pb2.Empty
                if m.output_type.full_name == "google.protobuf.Empty"
                else getattr(pb, m.output_type.name)
            )
            f.add(full, m.name, req, resp)
    for full, methods in f._methods.items():
        f.server.register(full, methods)
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a)
    serve = asyncio.create_task(f.server.serve_stream(sr, sw))
    cr, cw = await asyncio.open_unix_connection(sock=b)
    client = AgentClient(Client.from_stream(cr, cw), timeout_factor=3.0)
    try:
        yield f, client
    finally:
        await client.close()
        await f.server.close()
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)


async def test_timeouts_are_scaled_and_long_polls_unbounded(fake: tuple[FakeAgent, AgentClient]) -> None:
    f, c = fake
    f.answers["WaitProcess"] = pb.WaitProcessResponse(exit_status=3)
    await c.stats_container("c1")
    await c.wait_process("c1")
    timeouts = {name: t for name, _, t in f.calls}
    assert timeouts["StatsContainer"] == pytest.approx(TIMEOUTS["StatsContainer"] * 3.0, rel=0.01)
    assert timeouts["WaitProcess"] is None
    assert {k for k, v in TIMEOUTS.items() if v is None} == {
        "WaitProcess",
        "ReadStdout",
        "ReadStderr",
        "GetOOMEvent",
    }
    assert set(TIMEOUTS) == {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}


async def test_answers_become_dataclasses(fake: tuple[FakeAgent, AgentClient]) -> None:
    f, c = fake
    w = pb.WaitProcessResponse(exit_status=137, oom_killed=True)
    w.exited_at.FromSeconds(1_700_000_000)
    f.answers["WaitProcess"] = w
    f.answers["ReadStdout"] = pb.ReadOutputResponse(data=b"abc")
    f.answers["CreateContainer"] = pb.CreateContainerResponse(pid=42)
    ex = await c.wait_process("c1")
    assert isinstance(ex, ExitStatus) and ex.exit_status == 137 and ex.oom_killed
    assert ex.exited_at.timestamp() == 1_700_000_000 and ex.exited_at.tzinfo is not None
    assert await c.read_stdout("c1") == Output(b"abc", False)
    assert await c.create_container("c1", {"process": {}}, Stdio(stdin=True)) == 42
    _, req, _ = f.calls[-1]
    assert req.stdio.stdin and req.oci_spec_json == b'{"process":{}}'


@pytest.mark.parametrize(
    ("method", "answer", "call"),
    [
        ("WaitProcess", pb.WaitProcessResponse(exit_status=256), lambda c: c.wait_process("c1")),
        ("ReadStdout", pb.ReadOutputResponse(data=b"x" * 11), lambda c: c.read_stdout("c1", "", 10)),
        ("ReadStdout", pb.ReadOutputResponse(), lambda c: c.read_stdout("c1")),
        ("ReadStderr", pb.ReadOutputResponse(data=b"x", eof=True), lambda c: c.read_stderr("c1")),
        (
            "CreateContainer",
            pb.CreateContainerResponse(pid=0),
            lambda c: c.create_container("c1", {}, Stdio()),
        ),
        ("GetOOMEvent", pb.GetOOMEventResponse(container_id="../etc"), lambda c: c.get_oom_event()),
        ("GuestDetails", pb.GuestDetailsResponse(memory_block_size_bytes=3000), lambda c: c.guest_details()),
        ("Version", pb.VersionResponse(agent_version="v" * 10000), lambda c: c.version()),
        ("WriteStdin", pb.WriteStdinResponse(written=99), lambda c: c.write_stdin("c1", "", b"abc")),
        (
            "ListProcesses",
            pb.ListProcessesResponse(processes=[pb.ProcessInfo(pid=1, exec_id="a/b")]),
            lambda c: c.list_processes("c1"),
        ),
    ],
)
async def test_untrusted_answers_are_rejected(
    fake: tuple[FakeAgent, AgentClient], method: str, answer: Any, call: Callable[[AgentClient], Any]
) -> None:
    f, c = fake
    f.answers[method] = answer
    with pytest.raises(GuestError):
        await call(c)


async def test_errors_map_to_classes(fake: tuple[FakeAgent, AgentClient]) -> None:
    f, c = fake
    f.answers["StartContainer"] = NotFound("container x not found")
    with pytest.raises(NotFound, match="container x not found"):
        await c.start_container("x")


async def test_big_stdin_is_chunked_and_bad_input_refused_locally(
    fake: tuple[FakeAgent, AgentClient],
) -> None:
    f, c = fake
    f.answers["WriteStdin"] = lambda req: pb.WriteStdinResponse(written=len(req.data))
    data = b"z" * (MAX_IO_CHUNK * 2 + 5)
    assert await c.write_stdin("c1", "", data) == len(data)
    sizes = [len(r.data) for name, r, _ in f.calls if name == "WriteStdin"]
    assert sizes == [MAX_IO_CHUNK, MAX_IO_CHUNK, 5]
    with pytest.raises(InvalidArgument):
        await c.create_container("../x", {}, Stdio())
    with pytest.raises(InvalidArgument):
        await c.create_container("c2", b"x" * (5 << 20), Stdio())
    with pytest.raises(InvalidArgument):
        await c.resize_tty("c1", "", 70000, 1)
    with pytest.raises(InvalidArgument):
        AgentClient(c.ttrpc, timeout_factor=0)


async def test_create_sandbox_sends_host_time_and_fresh_entropy(fake: tuple[FakeAgent, AgentClient]) -> None:
    """A VM restored from a template has the template's clock and CRNG state: every CreateSandbox
    carries the host's time and new random bytes, unless the caller gives its own."""
    f, c = fake
    before = datetime.now(UTC)
    await c.create_sandbox(sandbox_id="sb", share_tag="pyvm-shared")
    await c.create_sandbox()
    (_, first, timeout), (_, second, plain_timeout) = f.calls
    assert first.sandbox_id == "sb" and first.share_tag == "pyvm-shared"
    assert first.HasField("host_time")
    sent = first.host_time.ToDatetime(tzinfo=UTC)
    assert before <= sent <= datetime.now(UTC)
    assert len(first.entropy) == SANDBOX_ENTROPY == 64 and first.entropy != second.entropy
    # mounting a share may wait for a hot-plugged tag: its deadline covers the agent's wait
    assert timeout == pytest.approx(TIMEOUTS["CreateSandbox"] * 3.0 + SHARE_WAIT, rel=0.01)
    assert plain_timeout == pytest.approx(TIMEOUTS["CreateSandbox"] * 3.0, rel=0.01)

    later = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    await c.create_sandbox(host_time=later, entropy=b"\x01" * MAX_ENTROPY)
    _, req, _ = f.calls[-1]
    assert req.host_time.ToDatetime(tzinfo=UTC) == later and req.entropy == b"\x01" * MAX_ENTROPY
    await c.create_sandbox(entropy=b"")
    assert f.calls[-1][1].entropy == b""


async def test_create_sandbox_refuses_bad_time_and_entropy_locally(
    fake: tuple[FakeAgent, AgentClient],
) -> None:
    f, c = fake
    with pytest.raises(InvalidArgument, match="513 bytes"):
        await c.create_sandbox(entropy=b"x" * (MAX_ENTROPY + 1))
    with pytest.raises(InvalidArgument, match="timezone"):
        await c.create_sandbox(host_time=datetime(2030, 1, 1))
    assert f.calls == []


async def test_prepare_template(fake: tuple[FakeAgent, AgentClient]) -> None:
    f, c = fake
    f.answers["PrepareTemplate"] = pb.PrepareTemplateResponse(
        modules_listed=30, modules_loaded=2, failures=["kernel/x.ko: No such file"], caches_dropped=True
    )
    r = await c.prepare_template()
    assert r == TemplatePrepared(30, 2, ("kernel/x.ko: No such file",), True)
    assert f.calls[-1][2] == pytest.approx(TIMEOUTS["PrepareTemplate"] * 3.0, rel=0.01)
    f.answers["PrepareTemplate"] = pb.PrepareTemplateResponse(modules_listed=1, modules_loaded=2)
    with pytest.raises(GuestError):
        await c.prepare_template()
