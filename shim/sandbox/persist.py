"""``state.json``: what a sandbox's shim daemon has set up, so that ``delete`` can clean up after a
shim that died (SIGKILL, OOM, crash) without talking to it.

Written atomically (temp file + rename) by the daemon whenever its set of containers changes; read by
``delete`` and by a later daemon. Standard library only (``delete`` imports it).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field

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


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    with contextlib.suppress(IndexError, ValueError):
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    return None


def daemon_alive(record: SandboxRecord) -> bool:
    """True if the shim daemon that wrote ``record`` is still running."""
    return record.shim_pid > 0 and process_start_time(record.shim_pid) == record.shim_start_time


__all__ = ["FORMAT_VERSION", "SandboxRecord", "daemon_alive", "load", "process_start_time", "save"]
