"""Our ttrpc client against the real Go ttrpc: containerd's own events service and the stock runc
shim's task API. This is the proof that our framing and envelopes are the real ones."""

from __future__ import annotations

import asyncio
import os
import stat
import time
import uuid
from collections.abc import Iterator

import pytest
from google.protobuf import empty_pb2
from google.protobuf.any_pb2 import Any

from shim import errors
from shim._pb.containerd.events import task_pb2 as events_pb2
from shim._pb.containerd.services.events.ttrpc.v1 import events_pb2 as events_service_pb2
from shim._pb.containerd.task.v2 import shim_pb2
from shim._pb.containerd.types.task import task_pb2
from shim.ttrpc import Client
from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image

pytestmark = [pytest.mark.containerd]

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
TASK_SERVICE = "containerd.task.v2.Task"
NS_KEY = "containerd-namespace-ttrpc"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    reason = Containerd.available()
    if reason is not None:
        pytest.skip(f"private containerd unavailable: {reason}")
    image = build_busybox_image(tmp_path_factory.mktemp("image") / "busybox.tar")
    with Containerd() as c:
        c.import_image(image)
        yield c


def _task_exit_envelope(container_id: str) -> events_service_pb2.ForwardRequest:
    event = events_pb2.TaskExit(container_id=container_id, id=container_id, pid=4242, exit_status=7)
    req = events_service_pb2.ForwardRequest()
    env = req.envelope
    env.timestamp.GetCurrentTime()
    env.namespace = "default"
    env.topic = "/tasks/exit"
    # containerd 1.6 only decodes bare type URLs (notes §0.6).
    env.event.CopyFrom(Any(type_url="containerd.events.TaskExit", value=event.SerializeToString()))
    return req


async def test_forward_event_to_containerd_is_seen_by_ctr_events(containerd: Containerd) -> None:
    cid = f"interop-{uuid.uuid4().hex[:8]}"
    events = await asyncio.create_subprocess_exec(
        containerd.ctr_binary,
        "--address",
        containerd.address,
        "events",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    client = await Client.connect_unix(containerd.ttrpc_address)
    try:
        assert events.stdout is not None
        seen = ""
        deadline = time.monotonic() + 30
        # `ctr events` subscribes asynchronously: forward until it shows up.
        while cid not in seen and time.monotonic() < deadline:
            resp = await client.call(
                EVENTS_SERVICE,
                "Forward",
                _task_exit_envelope(cid),
                empty_pb2.Empty,
                timeout=5,
                metadata={NS_KEY: "default"},
            )
            assert resp == empty_pb2.Empty()
            try:
                async with asyncio.timeout(1):
                    while cid not in seen:
                        line = await events.stdout.readline()
                        if not line:
                            break
                        seen += line.decode(errors="replace")
            except TimeoutError:
                pass
        assert cid in seen, f"ctr events printed: {seen!r}"
        line = next(ln for ln in seen.splitlines() if cid in ln)
        assert "/tasks/exit" in line and "cannot unmarshal" not in seen
        assert '"exit_status":7' in line.replace(" ", "")

        # Go's status codes come back as our classes: a bad topic is InvalidArgument (code 3) ...
        bad = _task_exit_envelope(cid)
        bad.envelope.topic = "no-leading-slash"
        with pytest.raises(errors.InvalidArgument):
            await client.call(EVENTS_SERVICE, "Forward", bad, empty_pb2.Empty, timeout=5)
        # ... and an unknown method is Unimplemented with Go's message.
        with pytest.raises(errors.Unimplemented, match="method Nope"):
            await client.call(EVENTS_SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
    finally:
        await client.close()
        if events.returncode is None:
            events.kill()
        await events.wait()


async def test_state_and_pids_from_the_runc_shim(containerd: Containerd) -> None:
    cid = f"runc-{uuid.uuid4().hex[:8]}"
    containerd.ctr(
        "run", "-d", "--runtime", "io.containerd.runc.v2", BUSYBOX_REF, cid, "sleep", "600", check=True
    )
    try:
        address = containerd.shim_address(cid)
        assert stat.S_ISSOCK(os.stat(address).st_mode)
        listed = containerd.ctr("tasks", "ls", check=True).stdout.split()
        pid = int(listed[listed.index(cid) + 1])

        client = await Client.connect_unix(address)
        try:
            state = await client.call(
                TASK_SERVICE, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse, timeout=5
            )
            assert state.id == cid
            assert state.status == task_pb2.RUNNING
            assert state.pid == pid
            assert state.bundle == str(containerd.bundle_dir(cid))

            pids = await client.call(
                TASK_SERVICE, "Pids", shim_pb2.PidsRequest(id=cid), shim_pb2.PidsResponse, timeout=5
            )
            assert pid in [p.pid for p in pids.processes]

            # Concurrent calls multiplexed on one connection against Go's server.
            many = await asyncio.gather(
                *(
                    client.call(TASK_SERVICE, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse)
                    for _ in range(20)
                )
            )
            assert {s.pid for s in many} == {pid}

            with pytest.raises(errors.NotFound):
                await client.call(
                    TASK_SERVICE, "State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse, timeout=5
                )
            with pytest.raises(errors.Unimplemented, match=r"service containerd\.task\.v3\.Task"):
                await client.call(
                    "containerd.task.v3.Task", "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse
                )
        finally:
            await client.close()
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        for _ in range(50):
            if containerd.ctr("tasks", "delete", "-f", cid).returncode == 0:
                break
            await asyncio.sleep(0.2)
        containerd.ctr("containers", "delete", cid)
