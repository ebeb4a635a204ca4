"""Task events as the service emits them (domain types), and the sink they go into.

The sink's ``publish`` only enqueues and never blocks, so the order of ``publish`` calls is the order
containerd sees. ``shim/api/events.py`` turns these into ``containerd.events.*`` messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from shim.sandbox.spec import Mount, Stdio


@dataclass(frozen=True)
class TaskCreate:
    container_id: str
    bundle: str
    rootfs: tuple[Mount, ...]
    stdio: Stdio
    checkpoint: str
    pid: int


@dataclass(frozen=True)
class TaskStart:
    container_id: str
    pid: int


@dataclass(frozen=True)
class TaskExit:
    """``id`` is the container id for the init process, the exec id for an exec."""

    container_id: str
    id: str
    pid: int
    exit_status: int
    exited_at: datetime


@dataclass(frozen=True)
class TaskDelete:
    container_id: str
    id: str
    pid: int
    exit_status: int
    exited_at: datetime | None


@dataclass(frozen=True)
class TaskExecAdded:
    container_id: str
    exec_id: str


@dataclass(frozen=True)
class TaskExecStarted:
    container_id: str
    exec_id: str
    pid: int


@dataclass(frozen=True)
class TaskPaused:
    container_id: str


@dataclass(frozen=True)
class TaskResumed:
    container_id: str


@dataclass(frozen=True)
class TaskOOM:
    container_id: str


TaskEvent = (
    TaskCreate
    | TaskStart
    | TaskExit
    | TaskDelete
    | TaskExecAdded
    | TaskExecStarted
    | TaskPaused
    | TaskResumed
    | TaskOOM
)


class EventSink(Protocol):
    def publish(self, event: TaskEvent) -> None:
        """Enqueue ``event``; must not block or raise (a full queue drops and counts)."""
        ...


class RecordingSink:
    """Keeps every event in order (used by tests and as the sink when nothing consumes events)."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    def publish(self, event: TaskEvent) -> None:
        self.events.append(event)


__all__ = [
    "EventSink",
    "RecordingSink",
    "TaskCreate",
    "TaskDelete",
    "TaskEvent",
    "TaskExecAdded",
    "TaskExecStarted",
    "TaskExit",
    "TaskOOM",
    "TaskPaused",
    "TaskResumed",
    "TaskStart",
]
