"""The backend the real daemon uses until the VM sandbox exists: it refuses to create containers.

This is the one placeholder the Foundation issue allows; the end-to-end issue replaces it with the
VM backend. Everything else (start/delete, the task API, events, state) is real.
"""

from __future__ import annotations

from collections.abc import Callable

from shim.errors import FailedPrecondition, NotFound
from shim.sandbox.spec import (
    ContainerRequest,
    ContainerStats,
    ExecRequest,
    ExitStatus,
    ProcessInfo,
    Resources,
)

MISSING = (
    "pyvm cannot create containers yet: the VM sandbox backend (QEMU + guest agent, issue 5) "
    "is not part of this build"
)


class UnavailableBackend:
    """Implements ``SandboxBackend``; ``create_container`` fails with FAILED_PRECONDITION."""

    @property
    def pid(self) -> int:
        return 0

    async def create_container(self, request: ContainerRequest) -> int:
        raise FailedPrecondition(
            f"{MISSING}; container {request.id} was not created", container_id=request.id
        )

    def _none(self, container_id: str) -> NotFound:
        return NotFound(f"container {container_id} not created: not found")

    async def start(self, container_id: str, exec_id: str) -> int:
        raise self._none(container_id)

    async def exec(self, request: ExecRequest) -> None:
        raise self._none(request.container_id)

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        raise self._none(container_id)

    async def wait(self, container_id: str, exec_id: str) -> ExitStatus:
        raise self._none(container_id)

    async def pids(self, container_id: str) -> list[ProcessInfo]:
        raise self._none(container_id)

    async def stats(self, container_id: str) -> ContainerStats:
        raise self._none(container_id)

    async def update(self, container_id: str, resources: Resources) -> None:
        raise self._none(container_id)

    async def pause(self, container_id: str) -> None:
        raise self._none(container_id)

    async def resume(self, container_id: str) -> None:
        raise self._none(container_id)

    async def close_io(self, container_id: str, exec_id: str) -> None:
        raise self._none(container_id)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        raise self._none(container_id)

    async def delete(self, container_id: str, exec_id: str) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def on_oom(self, callback: Callable[[str], None]) -> None:
        return None


__all__ = ["MISSING", "UnavailableBackend"]
