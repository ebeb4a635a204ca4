"""The task API through the real ttrpc edge: codes, wire forms, event order as containerd sees it."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import any_pb2, empty_pb2

from shim._pb.containerd.task.v2 import shim_pb2
from shim._pb.containerd.types.task import task_pb2
from shim.api.translate import PROCESS_SPEC_URL, RESOURCES_URL
from shim.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
    Unimplemented,
)

from .conftest import Stack

V2 = "containerd.task.v2.Task"
V3 = "containerd.task.v3.Task"
E = empty_pb2.Empty


async def call(stack: Stack, method: str, req, resp_type, service: str = V2):  # type: ignore[no-untyped-def]
    return await stack.client.call(service, method, req, resp_type, timeout=5)


async def create(stack: Stack, cid: str = "c1", service: str = V2) -> shim_pb2.CreateTaskResponse:
    return await call(
        stack,
        "Create",
        shim_pb2.CreateTaskRequest(id=cid, bundle=stack.bundle, stdout="/run/x/c1-stdout"),
        shim_pb2.CreateTaskResponse,
        service,
    )


async def wait_events(stack: Stack, n: int) -> list[str]:
    for _ in range(200):
        if len(stack.containerd.envelopes) >= n:
            break
        await asyncio.sleep(0.01)
    return stack.containerd.topics


@pytest.mark.parametrize("service", [V2, V3])
async def test_lifecycle_over_ttrpc_with_events_in_order(stack: Stack, service: str) -> None:
    assert (await create(stack, service=service)).pid == 4242
    st = await call(stack, "State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse, service)
    assert st.status == task_pb2.CREATED and st.bundle == stack.bundle and st.stdout == "/run/x/c1-stdout"
    assert not st.HasField("exited_at"), "a live process must not carry a zero exited_at"
    assert (
        await call(stack, "Start", shim_pb2.StartRequest(id="c1"), shim_pb2.StartResponse, service)
    ).pid == 4242
    waiter = asyncio.create_task(
        call(stack, "Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse, service)
    )
    await asyncio.sleep(0.05)
    assert not waiter.done()
    stack.backend.exit("c1", "", 7)
    w = await asyncio.wait_for(waiter, 2)
    assert w.exit_status == 7 and w.exited_at.seconds > 1_600_000_000
    d = await call(stack, "Delete", shim_pb2.DeleteRequest(id="c1"), shim_pb2.DeleteResponse, service)
    assert d.exit_status == 7 and d.exited_at == w.exited_at
    await call(stack, "Shutdown", shim_pb2.ShutdownRequest(id="c1"), E, service)
    assert stack.service.shutdown_requested.is_set()
    topics = await wait_events(stack, 4)
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    decoded = stack.containerd.decoded()
    assert [t for _, t, _ in decoded] == [
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskExit",
        "containerd.events.TaskDelete",
    ]
    exit_msg = decoded[2][2]
    assert (exit_msg.container_id, exit_msg.id, exit_msg.exit_status) == ("c1", "c1", 7)
    assert all(e.namespace == "ns1" for e in stack.containerd.envelopes)
    assert stack.containerd.metadata[0]["containerd-namespace-ttrpc"] == ["ns1"]


@pytest.mark.parametrize(
    ("method", "request_msg", "resp", "error"),
    [
        ("State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse, NotFound),
        ("Start", shim_pb2.StartRequest(id="nope"), shim_pb2.StartResponse, NotFound),
        ("Kill", shim_pb2.KillRequest(id="nope", signal=9), E, NotFound),
        ("Delete", shim_pb2.DeleteRequest(id="nope"), shim_pb2.DeleteResponse, NotFound),
        ("State", shim_pb2.StateRequest(id="../etc"), shim_pb2.StateResponse, InvalidArgument),
        ("State", shim_pb2.StateRequest(id="c1", exec_id="a/b"), shim_pb2.StateResponse, InvalidArgument),
        (
            "Create",
            shim_pb2.CreateTaskRequest(id="c2", bundle="relative"),
            shim_pb2.CreateTaskResponse,
            InvalidArgument,
        ),
        ("Checkpoint", shim_pb2.CheckpointTaskRequest(id="c1"), E, Unimplemented),
        (
            "Create",
            shim_pb2.CreateTaskRequest(id="c1", bundle="/b"),
            shim_pb2.CreateTaskResponse,
            AlreadyExists,
        ),
        ("Pause", shim_pb2.PauseRequest(id="c1"), E, FailedPrecondition),
        ("Exec", shim_pb2.ExecProcessRequest(id="c1", exec_id="e1"), E, FailedPrecondition),
    ],
)
async def test_error_codes_through_the_edge(stack: Stack, method: str, request_msg, resp, error) -> None:  # type: ignore[no-untyped-def]
    await create(stack)
    with pytest.raises(error):
        await call(stack, method, request_msg, resp)


async def test_checkpoint_message_and_unknown_method(stack: Stack) -> None:
    await create(stack)
    with pytest.raises(Unimplemented, match="checkpoint is not supported"):
        await call(stack, "Checkpoint", shim_pb2.CheckpointTaskRequest(id="c1"), E)
    with pytest.raises(Unimplemented, match="method Bogus"):
        await call(stack, "Bogus", shim_pb2.StateRequest(id="c1"), E)


async def test_unexpected_backend_exception_is_internal(stack: Stack) -> None:
    await create(stack)
    stack.backend.fail("pids", ZeroDivisionError("boom"))
    with pytest.raises(ShimError) as info:
        await call(stack, "Pids", shim_pb2.PidsRequest(id="c1"), shim_pb2.PidsResponse)
    assert type(info.value).__name__ == "Internal" and "ZeroDivisionError" in str(info.value)


async def test_kill_before_start_releases_wait_over_ttrpc(stack: Stack) -> None:
    await create(stack)
    waiter = asyncio.create_task(call(stack, "Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse))
    await asyncio.sleep(0.05)
    await call(stack, "Kill", shim_pb2.KillRequest(id="c1", signal=9, all=True), E)
    assert (await asyncio.wait_for(waiter, 2)).exit_status == 137
    st = await call(stack, "State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse)
    assert st.status == task_pb2.STOPPED and st.exit_status == 137 and st.HasField("exited_at")
    with pytest.raises(NotFound, match="already finished"):
        await call(stack, "Kill", shim_pb2.KillRequest(id="c1", signal=9), E)


async def test_exec_update_stats_connect(stack: Stack) -> None:
    await create(stack)
    await call(stack, "Start", shim_pb2.StartRequest(id="c1"), shim_pb2.StartResponse)
    spec = any_pb2.Any(type_url=PROCESS_SPEC_URL, value=b'{"args":["ls","-l"],"cwd":"/"}')
    await call(stack, "Exec", shim_pb2.ExecProcessRequest(id="c1", exec_id="e1", spec=spec), E)
    assert stack.backend.processes[("c1", "e1")].args == ["ls", "-l"]
    bad = any_pb2.Any(type_url=PROCESS_SPEC_URL, value=b"{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        await call(stack, "Exec", shim_pb2.ExecProcessRequest(id="c1", exec_id="e2", spec=bad), E)
    res = any_pb2.Any(type_url=RESOURCES_URL, value=b'{"memory":{"limit":1073741824}}')
    await call(stack, "Update", shim_pb2.UpdateTaskRequest(id="c1", resources=res), E)
    assert stack.backend.resources["c1"].linux == {"memory": {"limit": 1073741824}}
    stats = await call(stack, "Stats", shim_pb2.StatsRequest(id="c1"), shim_pb2.StatsResponse)
    assert stats.stats.type_url in ("io.containerd.cgroups.v1.Metrics", "io.containerd.cgroups.v2.Metrics")
    conn = await call(stack, "Connect", shim_pb2.ConnectRequest(id="c1"), shim_pb2.ConnectResponse)
    assert (conn.shim_pid, conn.task_pid) == (7, 4242)
    pids = await call(stack, "Pids", shim_pb2.PidsRequest(id="c1"), shim_pb2.PidsResponse)
    assert [p.pid for p in pids.processes] == [4242]
    topics = await wait_events(stack, 3)
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added"]


async def test_shutdown_with_a_task_left_keeps_serving(stack: Stack) -> None:
    await create(stack)
    await call(stack, "Shutdown", shim_pb2.ShutdownRequest(id="c1"), E)
    assert not stack.service.shutdown_requested.is_set()
    st = await call(stack, "State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse)
    assert st.id == "c1"


@pytest.mark.parametrize("v2", [True, False])
def test_stats_any_carries_the_numbers_cri_reads(v2: bool) -> None:
    from shim._pb.containerd.cgroups.v1 import metrics_pb2 as cg1
    from shim._pb.containerd.cgroups.v2 import metrics_pb2 as cg2
    from shim.api.translate import stats_any
    from shim.sandbox.spec import ContainerStats

    s = ContainerStats(
        cpu_usage_ns=5_000_000, memory_usage=100, memory_limit=200, memory_inactive_file=10, memory_anon=50
    )
    a = stats_any(s, cgroup_v2=v2)
    if v2:
        assert a.type_url == "io.containerd.cgroups.v2.Metrics"
        m2 = cg2.Metrics.FromString(a.value)
        assert (
            m2.cpu.usage_usec,
            m2.memory.usage,
            m2.memory.usage_limit,
            m2.memory.inactive_file,
            m2.memory.anon,
        ) == (5000, 100, 200, 10, 50)
    else:
        assert a.type_url == "io.containerd.cgroups.v1.Metrics"
        m1 = cg1.Metrics.FromString(a.value)
        assert (
            m1.cpu.usage.total,
            m1.memory.usage.usage,
            m1.memory.usage.limit,
            m1.memory.total_inactive_file,
        ) == (5_000_000, 100, 200, 10)
