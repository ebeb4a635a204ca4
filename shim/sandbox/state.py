"""Lifecycle states of containers and processes: Enums, transition tables and one guard.

Modelled on QEMU's ``Runstate`` + ``@require`` and containerd's runc process states: every change
goes through ``StateMachine.transition`` (which logs it), every precondition through
``StateMachine.require``; both raise ``shim.errors.InvalidState`` (FAILED_PRECONDITION), whose
message reads like containerd's ("cannot start: task c1 is stopped, must be created").
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from shim.errors import InvalidState


class ContainerState(enum.Enum):
    """A container follows its init process, plus pause/resume (which only containers do)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class ProcessState(enum.Enum):
    """An init or exec process. DELETED is terminal: the object is gone from the service's tables."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


CONTAINER_TRANSITIONS: Mapping[ContainerState, frozenset[ContainerState]] = {
    ContainerState.CREATED: frozenset(
        {ContainerState.RUNNING, ContainerState.STOPPED, ContainerState.DELETED}
    ),
    ContainerState.RUNNING: frozenset({ContainerState.PAUSED, ContainerState.STOPPED}),
    ContainerState.PAUSED: frozenset({ContainerState.RUNNING, ContainerState.STOPPED}),
    ContainerState.STOPPED: frozenset({ContainerState.DELETED}),
    ContainerState.DELETED: frozenset(),
}

PROCESS_TRANSITIONS: Mapping[ProcessState, frozenset[ProcessState]] = {
    # CREATED -> STOPPED: killed before it was ever started (containerd needs Wait released then).
    ProcessState.CREATED: frozenset({ProcessState.RUNNING, ProcessState.STOPPED, ProcessState.DELETED}),
    ProcessState.RUNNING: frozenset({ProcessState.STOPPED}),
    ProcessState.STOPPED: frozenset({ProcessState.DELETED}),
    ProcessState.DELETED: frozenset(),
}

S = TypeVar("S", bound=enum.Enum)


class StateMachine(Generic[S]):
    """The state of one object. Only touched from the event loop (no locking needed)."""

    def __init__(
        self,
        what: str,
        initial: S,
        transitions: Mapping[S, frozenset[S]],
        on_change: Callable[[S, S], None] | None = None,
    ) -> None:
        """``what`` names the object in error messages (``"task c1"``, ``"exec e1 of task c1"``);
        ``on_change(old, new)`` is called after every transition (logging)."""
        self.what = what
        self._state = initial
        self._transitions = transitions
        self._on_change = on_change

    @property
    def state(self) -> S:
        return self._state

    def is_in(self, *states: S) -> bool:
        return self._state in states

    def require(self, action: str, *allowed: S) -> None:
        """:raises InvalidState: unless the current state is one of ``allowed``."""
        if self._state not in allowed:
            raise InvalidState(f"cannot {action}: {self.what}", self._state, list(allowed))

    def transition(self, new: S, action: str | None = None) -> None:
        """Move to ``new``.

        :raises InvalidState: when the table has no edge from the current state to ``new``.
        """
        old = self._state
        if new not in self._transitions[old]:
            allowed = [s for s, targets in self._transitions.items() if new in targets]
            raise InvalidState(f"cannot {action or new.value}: {self.what}", old, allowed)
        self._state = new
        if self._on_change is not None:
            self._on_change(old, new)


__all__ = [
    "CONTAINER_TRANSITIONS",
    "PROCESS_TRANSITIONS",
    "ContainerState",
    "ProcessState",
    "StateMachine",
]
