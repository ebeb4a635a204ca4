"""``state.json``: what a sandbox's shim daemon has set up, so that ``delete`` can clean up after a
shim that died (SIGKILL, OOM, crash) without talking to it.

Written atomically (temp file + rename) by the daemon whenever its set of containers changes; read by
``delete`` and by a later daemon. Standard library only (``delete`` imports it).

Ownership: sandbox directories are keyed by sandbox id only (``<run root>/sbs/<id>``, as Kata's
``/run/vc/sbs/<id>``), so the same id in two containerd namespaces would share one. The first daemon
``claim``s it (its record names its namespace); while it lives, ``start`` of the same id in another
namespace is refused with ``AlreadyExists`` naming the owner, a second daemon's ``claim`` is refused
too, and ``delete`` from another namespace leaves the directory alone. A dead owner's directory may be
claimed (its own ``delete`` then finds a record of another namespace and leaves it alone).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field

from shim.errors import AlreadyExists
from shim.paths import SandboxDir

FORMAT_VERSION = 1


@dataclass
class SandboxRecord:
    """``shim_start_time`` is the daemon's start time in clock ticks (``/proc/<pid>/stat`` field
    22), so a recycled pid is never mistaken for the daemon."""

    sandbox_id: str
    namespace: str
    address: str
    bundle: str
    shim_pid: int
    shim_start_time: int
    containers: dict[str, dict[str, str]] = field(default_factory=dict)
    #: the sandbox's CRI annotations (``io.kubernetes.cri.sandbox-{uid,name,namespace}``); ``pyvm
    #: monitor`` turns them into the ``cri_*`` labels. Empty for a plain ``ctr run`` container.
    annotations: dict[str, str] = field(default_factory=dict)
    version: int = FORMAT_VERSION


def save(sdir: SandboxDir, record: SandboxRecord) -> None:
    """Write ``record`` to ``sdir.state_json`` atomically (creating the directory, mode 0700)."""
    sdir.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = sdir.state_json.with_name(f".{sdir.state_json.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(record), f, indent=1, sort_keys=True)
    os.replace(tmp, sdir.state_json)


def load(sdir: SandboxDir) -> SandboxRecord | None:
    """The record, or ``None`` if there is none or it is unreadable (a torn or foreign file)."""
    try:
        with open(sdir.state_json, encoding="utf-8") as f:
            raw = json.load(f)
        return SandboxRecord(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or ``None`` if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 overall
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or ``None`` if there is no such process."""
    st = _stat(pid)
    return st[1] if st is not None else None


def daemon_alive(record: SandboxRecord) -> bool:
    """True if the shim daemon that wrote ``record`` is still running. A zombie is dead: a SIGKILLed
    shim stays one until containerd (its subreaper) reaps it, which may be after ``delete`` runs."""
    if record.shim_pid <= 0:
        return False
    st = _stat(record.shim_pid)
    return st is not None and st[1] == record.shim_start_time and st[0] not in ("Z", "X")


def refuse_other_namespace(sdir: SandboxDir, namespace: str) -> None:
    """:raises AlreadyExists: a live daemon of another containerd namespace owns ``sdir``."""
    record = load(sdir)
    if record is not None and record.namespace != namespace and daemon_alive(record):
        raise AlreadyExists(
            f"sandbox id {sdir.sandbox_id} is already in use in containerd namespace "
            f"{record.namespace!r} (shim pid {record.shim_pid}); pyvm keeps one sandbox directory per "
            f"id ({sdir.root}), so ids must be unique across namespaces on a node: use another id",
            sandbox_id=sdir.sandbox_id,
            namespace=namespace,
            owner_namespace=record.namespace,
        )


def claim(sdir: SandboxDir, record: SandboxRecord) -> None:
    """:func:`save` ``record`` as the owner of ``sdir``, unless a live daemon of another namespace owns
    it. Check and write happen under an exclusive lock of the ``sbs`` directory, so of two daemons
    claiming one id at once exactly one wins.

    :raises AlreadyExists: see :func:`refuse_other_namespace`; nothing was written.
    """
    sdir.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(sdir.root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refuse_other_namespace(sdir, record.namespace)
        save(sdir, record)
    finally:
        os.close(fd)  # releases the lock


__all__ = [
    "FORMAT_VERSION",
    "SandboxRecord",
    "claim",
    "daemon_alive",
    "load",
    "process_start_time",
    "refuse_other_namespace",
    "save",
]
