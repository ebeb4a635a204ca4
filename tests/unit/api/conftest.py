"""The whole shim stack in-process: fake backend -> TaskService -> TaskAPI -> ttrpc server on a unix
socket, events through the real publisher into a fake containerd events endpoint."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.api.events import EventPublisher
from shim.api.task_api import TaskAPI, ttrpc_server
from shim.service.task_service import TaskService
from shim.testing.fake_backend import FakeBackend
from shim.testing.fake_containerd import FakeContainerd
from shim.ttrpc import Client, Server


@dataclass
class Stack:
    backend: FakeBackend
    containerd: FakeContainerd
    publisher: EventPublisher
    service: TaskService
    api: TaskAPI
    server: Server
    client: Client
    socket: str
    bundle: str
    tmp: Path


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # unix socket paths are limited to ~107 bytes; pytest's tmp paths can be longer
    import tempfile

    return Path(tempfile.mkdtemp(prefix="pyvm-", dir="/tmp"))


@pytest.fixture
async def stack(short_tmp: Path) -> AsyncIterator[Stack]:
    bundle = short_tmp / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "inf"]}}))
    containerd = FakeContainerd()
    await containerd.serve(str(short_tmp / "cd.ttrpc"))
    publisher = EventPublisher(address=str(short_tmp / "cd.ttrpc"), namespace="ns1", backoff=0.01)
    publisher.start()
    backend = FakeBackend(pid=4242)
    service = TaskService(backend, publisher, shim_pid=7, version="test")
    api = TaskAPI(service)
    server = ttrpc_server(api)
    sock = str(short_tmp / "shim.sock")
    await server.serve_unix(sock)
    client = await Client.connect_unix(sock)
    try:
        yield Stack(
            backend, containerd, publisher, service, api, server, client, sock, str(bundle), short_tmp
        )
    finally:
        await client.close()
        await server.close()
        await service.close()
        await publisher.close()
        await containerd.close()
        import shutil

        shutil.rmtree(short_tmp, ignore_errors=True)
