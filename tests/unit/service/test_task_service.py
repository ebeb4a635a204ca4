"""TaskService over the fake backend: state machines, event order, Wait, errors."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from shim.errors import AlreadyExists, FailedPrecondition, InvalidState, NotFound, Unimplemented
from shim.sandbox.spec import ContainerRequest, ExecRequest, Resources, Stdio
from shim.sandbox.state import CONTAINER_TRANSITIONS, ContainerState, ProcessState, StateMachine
from shim.service import events as ev
from shim.service.task_service import TaskService
from shim.testing.fake_backend import FakeBackend


@pytest.fixture
def bundle(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "inf"]}}))
    return str(tmp_path)


@pytest.fixture
def sink() -> ev.RecordingSink:
    return ev.RecordingSink()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(pid=4242)


@pytest.fixture
def service(backend: FakeBackend, sink: ev.RecordingSink) -> TaskService:
    return TaskService(backend, sink, shim_pid=1, version="test")


def req(bundle: str, cid: str = "c1") -> ContainerRequest:
    return ContainerRequest(id=cid, bundle=bundle, stdio=Stdio(stdout="/tmp/out"))


def kinds(sink: ev.RecordingSink) -> list[str]:
    return [type(e).__name__ for e in sink.events]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- state machine ---------------------------------------------------------------------------------


def test_state_machine_rejects_unknown_edges_with_containerd_like_message() -> None:
    m = StateMachine("task c1", ContainerState.STOPPED, CONTAINER_TRANSITIONS)
    with pytest.raises(InvalidState) as info:
        m.transition(ContainerState.RUNNING, "start")
    assert "cannot start: task c1 is stopped" in str(info.value)
    assert info.value.current is ContainerState.STOPPED
    with pytest.raises(InvalidState, match="must be running"):
        m.require("pause", ContainerState.RUNNING)


def test_every_state_has_a_row_in_the_transition_tables() -> None:
    from shim.sandbox.state import PROCESS_TRANSITIONS

    assert set(CONTAINER_TRANSITIONS) == set(ContainerState)
    assert set(PROCESS_TRANSITIONS) == set(ProcessState)
    assert not CONTAINER_TRANSITIONS[ContainerState.DELETED]


# -- lifecycle and event order ----------------------------------------------------------------------


async def test_full_lifecycle_publishes_create_start_exit_delete_in_order(
    service: TaskService, backend: FakeBackend, sink: ev.RecordingSink, bundle: str
) -> None:
    assert await service.create(req(bundle)) == 4242
    assert service.state("c1", "").status == "created"
    assert await service.start("c1", "") == 4242
    assert service.state("c1", "").status == "running"
    waiter = asyncio.create_task(service.wait("c1", ""))
    await settle()
    assert not waiter.done()
    backend.exit("c1", "", 3)
    exit = await asyncio.wait_for(waiter, 1)
    assert exit.status == 3
    st = service.state("c1", "")
    assert st.status == "stopped" and st.exit_status == 3 and st.exited_at is not None
    result = await service.delete("c1", "")
    assert result.exit_status == 3 and result.exited_at == exit.exited_at
    assert kinds(sink) == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
    exit_ev = sink.events[2]
    assert isinstance(exit_ev, ev.TaskExit) and exit_ev.id == "c1" and exit_ev.exit_status == 3
    with pytest.raises(NotFound):
        service.state("c1", "")


async def test_exit_right_after_start_is_still_published_after_task_start(
    service: TaskService, backend: FakeBackend, sink: ev.RecordingSink, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    await service.create(req(str(tmp_path)))
    await service.start("c1", "")
    assert (await asyncio.wait_for(service.wait("c1", ""), 1)).status == 0
    assert kinds(sink) == ["TaskCreate", "TaskStart", "TaskExit"]


async def test_not_exited_process_has_no_exited_at(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    st = service.state("c1", "")
    assert st.exited_at is None and st.exit_status == 0


async def test_cannot_start_a_stopped_task(service: TaskService, backend: FakeBackend, bundle: str) -> None:
    await service.create(req(bundle))
    await service.start("c1", "")
    backend.exit("c1", "", 0)
    await service.wait("c1", "")
    with pytest.raises(InvalidState, match="cannot start: task c1 is stopped"):
        await service.start("c1", "")


async def test_kill_of_created_task_stops_it_with_137_and_releases_wait(
    service: TaskService, sink: ev.RecordingSink, bundle: str
) -> None:
    await service.create(req(bundle))
    waiter = asyncio.create_task(service.wait("c1", ""))
    await settle()
    await service.kill("c1", "", signal.SIGKILL, False)
    exit = await asyncio.wait_for(waiter, 1)
    assert exit.status == 137
    assert service.state("c1", "").status == "stopped"
    with pytest.raises(NotFound, match="process already finished"):
        await service.kill("c1", "", signal.SIGKILL, True)
    result = await service.delete("c1", "")
    assert result.exit_status == 137
    assert kinds(sink) == ["TaskCreate", "TaskExit", "TaskDelete"]


async def test_harmless_signal_to_created_task_changes_nothing(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    await service.kill("c1", "", 0, False)
    assert service.state("c1", "").status == "created"


async def test_delete_of_never_started_task_reports_killed(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    waiter = asyncio.create_task(service.wait("c1", ""))
    await settle()
    result = await service.delete("c1", "")
    assert result.exit_status == 137
    assert (await asyncio.wait_for(waiter, 1)).status == 137


async def test_running_task_cannot_be_deleted(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    await service.start("c1", "")
    with pytest.raises(InvalidState, match="cannot delete: task c1 is running"):
        await service.delete("c1", "")


async def test_kill_running_task_goes_through_backend(
    service: TaskService, backend: FakeBackend, bundle: str
) -> None:
    await service.create(req(bundle))
    await service.start("c1", "")
    await service.kill("c1", "", signal.SIGTERM, False)
    assert (await asyncio.wait_for(service.wait("c1", ""), 1)).status == 143


async def test_duplicate_and_unknown_ids(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    with pytest.raises(AlreadyExists):
        await service.create(req(bundle))
    with pytest.raises(NotFound):
        await service.start("nope", "")
    with pytest.raises(NotFound):
        service.state("c1", "nope")


async def test_backend_failure_on_create_leaves_nothing(
    service: TaskService, backend: FakeBackend, sink: ev.RecordingSink, bundle: str
) -> None:
    backend.fail("create_container", FailedPrecondition("no VM"))
    with pytest.raises(FailedPrecondition):
        await service.create(req(bundle))
    assert service.container_ids == [] and sink.events == []
    assert await service.create(req(bundle)) == 4242  # the id is free again


async def test_exec_lifecycle_and_events(
    service: TaskService, backend: FakeBackend, sink: ev.RecordingSink, bundle: str
) -> None:
    await service.create(req(bundle))
    with pytest.raises(InvalidState, match="must be running"):
        await service.exec(ExecRequest("c1", "e1", Stdio()))
    await service.start("c1", "")
    await service.exec(ExecRequest("c1", "e1", Stdio(), {"args": ["ls"]}))
    with pytest.raises(AlreadyExists):
        await service.exec(ExecRequest("c1", "e1", Stdio()))
    await service.start("c1", "e1")
    backend.exit("c1", "e1", 2)
    assert (await asyncio.wait_for(service.wait("c1", "e1"), 1)).status == 2
    await service.delete("c1", "e1")
    with pytest.raises(NotFound):
        service.state("c1", "e1")
    assert kinds(sink) == ["TaskCreate", "TaskStart", "TaskExecAdded", "TaskExecStarted", "TaskExit"]
    exit_ev = sink.events[-1]
    assert isinstance(exit_ev, ev.TaskExit) and exit_ev.id == "e1" and exit_ev.container_id == "c1"


async def test_kill_of_an_exec_that_is_not_started_is_refused_and_changes_nothing(
    service: TaskService, backend: FakeBackend, sink: ev.RecordingSink, bundle: str
) -> None:
    # as runc's shim ("process not created"); accepting it made ctr's failed Start wait forever
    # for output from an exec that never ran
    await service.create(req(bundle))
    await service.start("c1", "")
    await service.exec(ExecRequest("c1", "e1", Stdio(stdout="/tmp/e1-out"), {"args": ["sleep", "9"]}))
    with pytest.raises(FailedPrecondition, match="exec e1 of task c1 is not started"):
        await service.kill("c1", "e1", signal.SIGTERM, False)
    assert service.state("c1", "e1").status == "created"
    assert ("kill", "c1", "e1") not in backend.calls
    await service.start("c1", "e1")
    await service.kill("c1", "e1", signal.SIGTERM, False)
    assert (await asyncio.wait_for(service.wait("c1", "e1"), 1)).status == 143
    assert kinds(sink)[-3:] == ["TaskExecAdded", "TaskExecStarted", "TaskExit"]


async def test_kill_during_an_execs_start_signals_the_started_process(
    service: TaskService, backend: FakeBackend, bundle: str
) -> None:
    await service.create(req(bundle))
    await service.start("c1", "")
    await service.exec(ExecRequest("c1", "e1", Stdio(), {"args": ["sleep", "9"]}))
    gate = asyncio.Event()
    real_start = backend.start

    async def slow_start(container_id: str, exec_id: str) -> int:
        await gate.wait()
        return await real_start(container_id, exec_id)

    backend.start = slow_start  # type: ignore[method-assign]
    starting = asyncio.create_task(service.start("c1", "e1"))
    await settle()
    killing = asyncio.create_task(service.kill("c1", "e1", signal.SIGKILL, False))
    await settle()
    assert not killing.done(), "the kill waits for the Start in progress"
    gate.set()
    await asyncio.wait_for(asyncio.gather(starting, killing), 1)
    assert (await asyncio.wait_for(service.wait("c1", "e1"), 1)).status == 137


async def test_init_exit_ends_execs_and_exec_exit_precedes_nothing_wrong(
    service: TaskService, backend: FakeBackend, bundle: str
) -> None:
    await service.create(req(bundle))
    await service.start("c1", "")
    await service.exec(ExecRequest("c1", "e1", Stdio()))
    await service.start("c1", "e1")
    backend.exit("c1", "", 0)
    assert (await asyncio.wait_for(service.wait("c1", "e1"), 1)).status == 137


async def test_pause_resume(service: TaskService, sink: ev.RecordingSink, bundle: str) -> None:
    await service.create(req(bundle))
    with pytest.raises(InvalidState, match="cannot pause: task c1 is created"):
        await service.pause("c1")
    await service.start("c1", "")
    await service.pause("c1")
    assert service.state("c1", "").status == "paused"
    with pytest.raises(InvalidState):
        await service.pause("c1")
    await service.resume("c1")
    assert service.state("c1", "").status == "running"
    assert kinds(sink)[-2:] == ["TaskPaused", "TaskResumed"]


async def test_checkpoint_is_unimplemented_with_a_clear_message(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    with pytest.raises(Unimplemented, match="checkpoint is not supported"):
        await service.checkpoint("c1")


async def test_update_stats_pids_closeio_resize(
    service: TaskService, backend: FakeBackend, bundle: str
) -> None:
    await service.create(req(bundle))
    await service.start("c1", "")
    await service.update("c1", Resources({"memory": {"limit": 1 << 30}}))
    assert backend.resources["c1"].linux["memory"]["limit"] == 1 << 30
    assert (await service.stats("c1")).memory_usage > 0
    assert [p.pid for p in await service.pids("c1")] == [4242]
    await service.close_io("c1", "")
    await service.resize_pty("c1", "", 80, 25)
    assert backend.processes[("c1", "")].stdin_closed
    assert backend.processes[("c1", "")].size == (80, 25)


async def test_oom_event_for_known_container_only(
    service: TaskService, backend: FakeBackend, sink: ev.RecordingSink, bundle: str
) -> None:
    await service.create(req(bundle))
    backend.oom("c1")
    backend.oom("other")
    assert kinds(sink) == ["TaskCreate", "TaskOOM"]


async def test_shutdown_only_when_no_task_left(
    service: TaskService, backend: FakeBackend, bundle: str
) -> None:
    await service.create(req(bundle))
    assert service.shutdown() is False
    assert not service.shutdown_requested.is_set()
    await service.kill("c1", "", 9, False)
    await service.delete("c1", "")
    assert service.shutdown() is True
    assert service.shutdown_requested.is_set()
    with pytest.raises(FailedPrecondition, match="shutting down"):
        await service.create(req(bundle, "c2"))
    await service.close()
    assert backend.shut_down


async def test_lost_backend_wait_reports_255(service: TaskService, backend: FakeBackend, bundle: str) -> None:
    await service.create(req(bundle))
    backend.fail("wait", RuntimeError("agent connection lost"))
    await service.start("c1", "")
    assert (await asyncio.wait_for(service.wait("c1", ""), 1)).status == 255


async def test_connect_reports_shim_and_task_pid(service: TaskService, bundle: str) -> None:
    await service.create(req(bundle))
    c = service.connect("c1")
    assert (c.shim_pid, c.task_pid, c.version) == (1, 4242, "test")


async def test_containers_changed_callback(backend: FakeBackend, sink: ev.RecordingSink, bundle: str) -> None:
    seen: list[dict[str, str]] = []
    service = TaskService(
        backend, sink, shim_pid=1, version="t", on_containers_changed=lambda c: seen.append(dict(c))
    )
    await service.create(req(bundle))
    await service.delete("c1", "")
    assert seen == [{"c1": bundle}, {}]
