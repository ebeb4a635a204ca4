"""Fixtures for the ttrpc tests: a small test service served over a unix socket and a socketpair."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shim import errors
from shim._pb.ttrpc.request_pb2 import KeyValue, StringList
from shim.ttrpc import CallContext, Client, Method, Server

SERVICE = "test.v1.Echo"

_ERRORS = {
    "NotFound": errors.NotFound,
    "AlreadyExists": errors.AlreadyExists,
    "InvalidArgument": errors.InvalidArgument,
    "FailedPrecondition": errors.FailedPrecondition,
    "Unavailable": errors.Unavailable,
    "Unimplemented": errors.Unimplemented,
    "DeadlineExceeded": errors.DeadlineExceeded,
    "ResourceExhausted": errors.ResourceExhausted,
    "PermissionDenied": errors.PermissionDenied,
}


@dataclass
class Recorder:
    """What the test service saw; tests assert on it."""

    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    contexts: deque[CallContext] = field(default_factory=lambda: deque(maxlen=100))
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, what: list[str], key: str) -> None:
        what.append(key)
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], wait: float = 10) -> None:
        """Wait until ``predicate()`` holds, re-checking whenever a handler records something."""
        async with asyncio.timeout(wait):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def make_methods(rec: Recorder) -> dict[str, Method]:
    async def echo(req: KeyValue, ctx: CallContext) -> KeyValue:
        rec.contexts.append(ctx)
        return KeyValue(key=req.key, value=req.value)

    async def sleep(req: KeyValue, ctx: CallContext) -> KeyValue:
        rec.note(rec.started, req.key)
        try:
            await asyncio.sleep(float(req.value))
        except asyncio.CancelledError:
            rec.note(rec.cancelled, req.key)
            raise
        return KeyValue(key=req.key, value="slept")

    async def fail(req: KeyValue, ctx: CallContext) -> KeyValue:
        raise _ERRORS[req.key](req.value)

    async def boom(req: KeyValue, ctx: CallContext) -> KeyValue:
        raise ValueError("kaboom")

    async def timeout_error(req: KeyValue, ctx: CallContext) -> KeyValue:
        raise TimeoutError

    async def big(req: KeyValue, ctx: CallContext) -> KeyValue:
        return KeyValue(value="x" * int(req.value))

    async def meta(req: KeyValue, ctx: CallContext) -> StringList:
        items = [f"{k}={v}" for k, vs in sorted(ctx.metadata.items()) for v in vs]
        return StringList(list=[f"timeout={ctx.timeout}", *items])

    kv, sl = KeyValue, StringList
    return {
        "Echo": Method(kv, kv, echo),
        "Sleep": Method(kv, kv, sleep),
        "Fail": Method(kv, kv, fail),
        "Boom": Method(kv, kv, boom),
        "TimeoutError": Method(kv, kv, timeout_error),
        "Big": Method(kv, kv, big),
        "Meta": Method(kv, sl, meta),
    }


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def server(recorder: Recorder) -> AsyncIterator[Server]:
    srv = Server()
    srv.register(SERVICE, make_methods(recorder))
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def sock_path(server: Server, short_tmp: Path) -> Path:
    path = short_tmp / "ttrpc.sock"
    await server.serve_unix(path)
    return path


@pytest.fixture
async def unix_client(sock_path: Path) -> AsyncIterator[Client]:
    client = await Client.connect_unix(sock_path)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def socketpair_client(server: Server) -> AsyncIterator[Client]:
    """A client talking to ``server.serve_stream`` over a socketpair (how the guest agent is served)."""
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    cr, cw = await asyncio.open_connection(sock=b)
    serving = asyncio.create_task(server.serve_stream(sr, sw))
    client = Client.from_stream(cr, cw)
    try:
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(serving, 10)


@pytest.fixture(params=["unix", "socketpair"])
def client(request: pytest.FixtureRequest) -> Client:
    """The same tests over both transports."""
    return request.getfixturevalue(f"{request.param}_client")
