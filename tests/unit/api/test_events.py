"""EventPublisher: one queue, one forwarder, strict order, bounded retry, reconnect."""

# ruff: noqa: ASYNC240, ASYNC110 -- tests block briefly on the filesystem and poll predicates

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shim.api.events import EventPublisher
from shim.api.translate import event_any
from shim.service import events as ev
from shim.testing.fake_containerd import FakeContainerd


def lifecycle(cid: str) -> list[ev.TaskEvent]:
    now = datetime.now(UTC)
    return [
        ev.TaskCreate(cid, "/b", (), ev.Stdio(), "", 1),
        ev.TaskStart(cid, 1),
        ev.TaskExit(cid, cid, 1, 0, now),
        ev.TaskDelete(cid, cid, 1, 0, now),
    ]


async def until(pred, within: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within):
        while not pred():
            await asyncio.sleep(0.01)


_DIRS: list[Path] = []


def sock_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pyvm-ev-", dir="/tmp"))  # short: unix socket path limit
    _DIRS.append(d)
    return d


@pytest.fixture(autouse=True)
def _remove_sock_dirs() -> Iterator[None]:
    yield
    while _DIRS:
        shutil.rmtree(_DIRS.pop(), ignore_errors=True)


def test_type_urls_are_bare() -> None:
    for e in [*lifecycle("c1"), ev.TaskOOM("c1"), ev.TaskExecAdded("c1", "e"), ev.TaskPaused("c1")]:
        topic, any_msg = event_any(e)
        assert topic.startswith("/tasks/")
        assert any_msg.type_url.startswith("containerd.events.Task"), any_msg.type_url


async def test_order_is_preserved_across_a_failed_forward() -> None:
    d = sock_dir()
    cd = FakeContainerd(fail_next=2)
    await cd.serve(str(d / "cd"))
    pub = EventPublisher(address=str(d / "cd"), namespace="default", backoff=0.01)
    pub.start()
    try:
        for e in lifecycle("a") + lifecycle("b"):
            pub.publish(e)
        await until(lambda: len(cd.envelopes) == 8)
        assert [(e.topic, e.event.value[2:3]) for e in cd.envelopes][:4] == [
            ("/tasks/create", b"a"),
            ("/tasks/start", b"a"),
            ("/tasks/exit", b"a"),
            ("/tasks/delete", b"a"),
        ]
        assert pub.published == 8 and pub.failed == 0
    finally:
        await pub.close()
        await cd.close()


async def test_reconnects_after_containerd_restart() -> None:
    d = sock_dir()
    path = str(d / "cd")
    cd = FakeContainerd()
    await cd.serve(path)
    pub = EventPublisher(address=path, namespace="default", backoff=0.05)
    pub.start()
    try:
        pub.publish(ev.TaskOOM("c1"))
        await until(lambda: len(cd.envelopes) == 1)
        await cd.close()  # containerd goes away ...
        pub.publish(ev.TaskOOM("c2"))
        await asyncio.sleep(0.02)
        cd2 = FakeContainerd()  # ... and comes back on the same socket
        Path(path).unlink(missing_ok=True)
        await cd2.serve(path)
        await until(lambda: len(cd2.envelopes) == 1)
        assert pub.published == 2
        await cd2.close()
    finally:
        await pub.close()


async def test_gives_up_after_bounded_attempts_and_counts() -> None:
    d = sock_dir()
    pub = EventPublisher(address=str(d / "nobody"), namespace="default", attempts=3, backoff=0.01)
    pub.start()
    try:
        pub.publish(ev.TaskOOM("c1"))
        await until(lambda: pub.failed == 1)
        assert pub.published == 0
    finally:
        await pub.close()


async def test_rejected_envelope_is_not_retried() -> None:
    d = sock_dir()
    cd = FakeContainerd()
    await cd.serve(str(d / "cd"))
    pub = EventPublisher(address=str(d / "cd"), namespace="", attempts=5, backoff=10)
    pub.start()
    try:
        pub.publish(ev.TaskOOM("c1"))
        await until(lambda: pub.failed == 1, within=2)
    finally:
        await pub.close()
        await cd.close()


async def test_without_address_events_are_only_logged() -> None:
    pub = EventPublisher(address=None, namespace="default")
    pub.start()
    pub.publish(ev.TaskOOM("c1"))
    await pub.close()
    assert (pub.published, pub.failed, pub.dropped) == (0, 0, 0)


async def test_full_queue_drops_and_counts() -> None:
    pub = EventPublisher(address="/nonexistent", namespace="default", max_queue=2)
    for _ in range(3):
        pub.publish(ev.TaskOOM("c1"))
    assert pub.dropped == 1
