"""The seam between task orchestration and whatever runs the containers (one VM per sandbox).

``shim.service.task_service.TaskService`` owns the lifecycle state machines, event order and the
Wait bookkeeping; a backend only does the mechanism. One backend instance serves one sandbox (one
shim daemon); the first ``create_container`` typically brings the VM up.

Implementations: ``shim.sandbox.vm.VmSandbox`` (one QEMU VM per pod) and
``shim.testing.fake_backend.FakeBackend`` (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from shim.sandbox.spec import (
    ContainerRequest,
    ContainerStats,
    ExecRequest,
    ExitStatus,
    ProcessInfo,
    Resources,
)


@runtime_checkable
class SandboxBackend(Protocol):
    """Mechanism for one sandbox. ``exec_id`` is ``""`` for a container's init process.

    The service calls these only in states where they make sense (it guards with its own state
    machines first), serializes lifecycle calls per process, and never calls anything after
    ``shutdown``. Every method may raise a ``shim.errors.ShimError``; anything else becomes INTERNAL.
    """

    @property
    def pid(self) -> int:
        """The host pid that stands for the sandbox's processes (the hypervisor's; 0 if none yet)."""
        ...

    async def create_container(self, request: ContainerRequest) -> int:
        """Create the container and its init process (not started). Returns the pid to report.

        :raises FailedPrecondition: the sandbox cannot run containers (e.g. no VM support).
        """
        ...

    async def start(self, container_id: str, exec_id: str) -> int:
        """Start a created init or exec process; returns the pid to report."""
        ...

    async def exec(self, request: ExecRequest) -> None:
        """Add (not start) an exec process to a running container."""
        ...

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        """Send ``signal`` to one process (or, with ``all``, to every process of the container)."""
        ...

    async def wait(self, container_id: str, exec_id: str) -> ExitStatus:
        """Block until a started process has exited **and its output is drained** into the client's
        FIFOs/URIs; only then may the exit be reported. Called once per started process."""
        ...

    async def pids(self, container_id: str) -> list[ProcessInfo]: ...

    async def stats(self, container_id: str) -> ContainerStats: ...

    async def update(self, container_id: str, resources: Resources) -> None:
        """Apply new resources (and resize the sandbox if that is the policy).

        :raises ResourceExhausted: the sandbox cannot grow that far; nothing was changed.
        """
        ...

    async def pause(self, container_id: str) -> None: ...

    async def resume(self, container_id: str) -> None: ...

    async def close_io(self, container_id: str, exec_id: str) -> None:
        """Close the process's stdin (the client reached EOF)."""
        ...

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None: ...

    async def delete(self, container_id: str, exec_id: str) -> None:
        """Forget a stopped (or never started) process; for an init process remove the container,
        its mounts and shared files. Idempotent."""
        ...

    async def shutdown(self) -> None:
        """Tear the whole sandbox down (VM, helpers, mounts, files). Idempotent."""
        ...

    def on_oom(self, callback: Callable[[str], None]) -> None:
        """Register ``callback(container_id)``, called from the event loop when a container OOMs."""
        ...


__all__ = ["SandboxBackend"]
