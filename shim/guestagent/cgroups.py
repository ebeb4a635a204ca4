"""Reading a container's cgroup: stats, OOM kill count, member pids.

The guest runs cgroup v2 only. A legacy/hybrid v1 host (where the agent runs for tests) is read
through the v1 files with the same meaning, so host tests exercise the same code paths. Limits are
written by ``crun update``, never here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 62


def cgroup_version(root: Path = CGROUP_ROOT) -> int:
    """2 if ``root`` is a cgroup2 mount, 1 if it holds v1 hierarchies, 0 if neither."""
    if (root / "cgroup.controllers").exists():
        return 2
    return 1 if (root / "memory").is_dir() or (root / "cpu").is_dir() else 0


@dataclass
class Stats:
    cgroup_version: int
    cpu: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)


class ContainerCgroup:
    """The cgroup(s) of one container, found from ``/proc/<init pid>/cgroup`` at creation."""

    def __init__(self, version: int, paths: dict[str, Path]) -> None:
        self.version = version
        #: v2: {"": dir}; v1: {controller: dir}
        self.paths = paths

    @classmethod
    def of_pid(cls, pid: int, root: Path = CGROUP_ROOT) -> ContainerCgroup | None:
        version = cgroup_version(root)
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        paths: dict[str, Path] = {}
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _hid, controllers, rel = parts
            rel = rel.lstrip("/")
            if version == 2 and controllers == "":
                paths[""] = root / rel
            elif version == 1:
                for ctrl in controllers.split(","):
                    if ctrl in ("memory", "cpuacct", "pids", "cpu", "freezer"):
                        paths[ctrl] = root / ctrl / rel
                    elif ctrl == "cpu,cpuacct":
                        paths["cpuacct"] = root / "cpu,cpuacct" / rel
        return cls(version, paths) if paths else None

    def _dir(self, controller: str) -> Path | None:
        return self.paths.get("" if self.version == 2 else controller)

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unreadable)."""
        d = self._dir("memory")
        if d is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _kv(d / name).get("oom_kill", 0)

    def pids(self) -> list[int]:
        d = self._dir("pids") or self._dir("memory")
        if d is None:
            return []
        out: set[int] = set()
        for sub, _dirs, files in os.walk(d):
            if "cgroup.procs" in files:
                try:
                    text = Path(sub, "cgroup.procs").read_text()
                except OSError:
                    continue
                out.update(int(x) for x in text.split() if x.isdigit())
        return sorted(out)

    def stats(self) -> Stats:
        return self._stats_v2() if self.version == 2 else self._stats_v1()

    def _stats_v2(self) -> Stats:
        d = self.paths[""]
        st = Stats(2)
        cpu = _kv(d / "cpu.stat")
        st.cpu = {
            k: cpu.get(k, 0)
            for k in (
                "usage_usec",
                "user_usec",
                "system_usec",
                "nr_periods",
                "nr_throttled",
                "throttled_usec",
            )
        }
        mem = _kv(d / "memory.stat")
        st.memory = {
            "usage": _int(d / "memory.current"),
            "limit": _limit(d / "memory.max"),
            "max_usage": _int(d / "memory.peak"),
            "anon": mem.get("anon", 0),
            "file": mem.get("file", 0),
            "inactive_file": mem.get("inactive_file", 0),
            "active_file": mem.get("active_file", 0),
            "pgfault": mem.get("pgfault", 0),
            "pgmajfault": mem.get("pgmajfault", 0),
            "swap_usage": _int(d / "memory.swap.current"),
            "swap_limit": _limit(d / "memory.swap.max"),
            "oom_kill": _kv(d / "memory.events").get("oom_kill", 0),
        }
        st.pids = {"current": _int(d / "pids.current"), "limit": _limit(d / "pids.max")}
        return st

    def _stats_v1(self) -> Stats:
        st = Stats(1)
        hz = os.sysconf("SC_CLK_TCK") or 100
        if (d := self.paths.get("cpuacct")) is not None:
            cs = _kv(d / "cpuacct.stat")
            st.cpu = {
                "usage_usec": _int(d / "cpuacct.usage") // 1000,
                "user_usec": cs.get("user", 0) * 1_000_000 // hz,
                "system_usec": cs.get("system", 0) * 1_000_000 // hz,
            }
        if (d := self.paths.get("cpu")) is not None:
            ct = _kv(d / "cpu.stat")
            st.cpu.update(
                nr_periods=ct.get("nr_periods", 0),
                nr_throttled=ct.get("nr_throttled", 0),
                throttled_usec=ct.get("throttled_time", 0) // 1000,
            )
        if (d := self.paths.get("memory")) is not None:
            mem = _kv(d / "memory.stat")
            st.memory = {
                "usage": _int(d / "memory.usage_in_bytes"),
                "limit": _limit(d / "memory.limit_in_bytes"),
                "max_usage": _int(d / "memory.max_usage_in_bytes"),
                "anon": mem.get("total_rss", mem.get("rss", 0)),
                "file": mem.get("total_cache", mem.get("cache", 0)),
                "inactive_file": mem.get("total_inactive_file", 0),
                "active_file": mem.get("total_active_file", 0),
                "pgfault": mem.get("total_pgfault", 0),
                "pgmajfault": mem.get("total_pgmajfault", 0),
                "oom_kill": _kv(d / "memory.oom_control").get("oom_kill", 0),
            }
        if (d := self.paths.get("pids")) is not None:
            st.pids = {"current": _int(d / "pids.current"), "limit": _limit(d / "pids.max")}
        return st


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def _int(p: Path) -> int:
    text = _read(p).strip()
    return int(text) if text.isdigit() else 0


def _limit(p: Path) -> int:
    """A limit file's value; 0 for ``max`` or absurdly large (unlimited)."""
    text = _read(p).strip()
    if not text.isdigit():
        return 0
    v = int(text)
    return 0 if v >= _UNLIMITED else v


def _kv(p: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(p).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out
