"""One error hierarchy, named by what the caller should do, and the one table mapping it to status codes.

Every error that crosses a boundary (ttrpc, gRPC, the guest agent, the shim's CLI) is a ``ShimError``
subclass. Codes are the gRPC codes that ttrpc and containerd's ``errdefs`` share; containerd maps
errors by code only, so the class chosen here decides what containerd and kubelet do next.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any


class Code(enum.IntEnum):
    """gRPC status codes (identical in ttrpc's google.rpc.Status)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ShimError(Exception):
    """Base of every error pyvm raises on purpose. ``str(err)`` is the message users see."""

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        #: structured facts (argv, exit code, log tail, ...) for logs; never parsed for decisions.
        self.facts: dict[str, Any] = facts

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ShimError):
    """The request is wrong: fix the input (bad id, spec, option or config value)."""


class NotFound(ShimError):
    """No such container, exec, sandbox or file."""


class AlreadyExists(ShimError):
    """The id is taken."""


class FailedPrecondition(ShimError):
    """The system is not in a state where this can work; fix the state first."""


class InvalidState(FailedPrecondition):
    """An illegal lifecycle transition, e.g. starting a stopped task."""

    def __init__(self, what: str, current: object, required: Sequence[object] | object) -> None:
        req = required if isinstance(required, (list, tuple, set, frozenset)) else [required]
        names = ", ".join(_state_name(r) for r in req)
        super().__init__(
            f"{what} is {_state_name(current)}, must be {names}",
            current=_state_name(current),
            required=names,
        )
        self.current = current
        self.required = tuple(req)


class ResourceExhausted(ShimError):
    """Out of a bounded resource: max memory, hotplug slots, message size."""


class Unavailable(ShimError):
    """A peer (agent, QMP, containerd) is not reachable now; retrying may help."""


class DeadlineExceeded(ShimError):
    """A boot, agent or QMP operation did not finish in time."""


class Unimplemented(ShimError):
    """pyvm does not support this operation (e.g. Checkpoint)."""


class PermissionDenied(ShimError):
    """The caller may not do this."""


class Cancelled(ShimError):
    """The remote side cancelled the call."""


class Internal(ShimError):
    """A bug or an unexpected failure; the facts say what happened."""


class HypervisorError(Internal):
    """QEMU or virtiofsd failed."""


class VMLaunchFailure(HypervisorError):
    """QEMU exited or failed to come up; carries exit code, argv and the log tails."""


class QMPCommandError(HypervisorError):
    """A QMP command returned an error."""


class GuestError(Internal):
    """The guest agent failed with no better class."""


# The one table. Order matters only in that lookups walk the MRO from the most specific class.
_CODE_OF: dict[type[ShimError], Code] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    NotFound: Code.NOT_FOUND,
    AlreadyExists: Code.ALREADY_EXISTS,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    Unavailable: Code.UNAVAILABLE,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    Unimplemented: Code.UNIMPLEMENTED,
    PermissionDenied: Code.PERMISSION_DENIED,
    Cancelled: Code.CANCELLED,
    Internal: Code.INTERNAL,
}
_CLASS_OF: dict[Code, type[ShimError]] = {code: cls for cls, code in _CODE_OF.items()}


def code_of(exc: BaseException) -> Code:
    """Status code for an exception. Non-pyvm exceptions are INTERNAL, except TimeoutError."""
    if isinstance(exc, ShimError):
        for cls in type(exc).__mro__:
            if cls in _CODE_OF:
                return _CODE_OF[cls]  # type: ignore[index]
        return Code.UNKNOWN
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED
    return Code.INTERNAL


def to_status(exc: BaseException) -> tuple[Code, str]:
    """``(code, message)`` to put on the wire for ``exc``."""
    return code_of(exc), str(exc) or type(exc).__name__


def from_status(code: int, message: str) -> ShimError:
    """The native error for a remote status (like containerd's ``errgrpc.ToNative``)."""
    try:
        c = Code(code)
    except ValueError:
        c = Code.UNKNOWN
    cls = _CLASS_OF.get(c, Internal)
    err = cls(message, remote_code=int(code))
    return err


def _state_name(state: object) -> str:
    name = getattr(state, "name", None)
    return str(name).lower() if name is not None else str(state)


__all__ = [
    "AlreadyExists",
    "Cancelled",
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GuestError",
    "HypervisorError",
    "Internal",
    "InvalidArgument",
    "InvalidState",
    "NotFound",
    "PermissionDenied",
    "QMPCommandError",
    "ResourceExhausted",
    "ShimError",
    "Unavailable",
    "Unimplemented",
    "VMLaunchFailure",
    "code_of",
    "from_status",
    "to_status",
]
