"""Thin wrapper over the ``crun`` command line: argv building and error translation only.

crun's own errors go to a JSON log file per container (``--log``), never to the container's
stderr pipe; a failing command raises ``FailedPrecondition`` carrying crun's message.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from shim.errors import FailedPrecondition
from shim.guestagent.reaper import Reaper, run

DEFAULT_TIMEOUT = 120.0  # TCG fork/exec is slow; crun create never legitimately takes this long


class Crun:
    """Runs crun with a fixed state root (``--root``)."""

    def __init__(self, reaper: Reaper, *, binary: str = "crun", root: str = "/run/crun") -> None:
        self.reaper = reaper
        self.binary = shutil.which(binary) or binary
        self.root = root

    def _argv(self, log: Path | None, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if log is not None:
            argv += [f"--log=file:{log}", "--log-format=json"]
        return [*argv, *args]

    async def version(self) -> str:
        try:
            rc, out = await run(self.reaper, [self.binary, "--version"], timeout=30)
        except (OSError, TimeoutError):
            return ""
        return out.decode(errors="replace").splitlines()[0] if rc == 0 and out else ""

    async def command(
        self,
        log: Path | None,
        *args: str,
        stdio: tuple[int | None, int | None, int | None] | None = None,
        what: str,
        container_id: str,
    ) -> None:
        """Run ``crun <args>``; raise ``NotFound``/``FailedPrecondition`` with crun's message."""
        argv = self._argv(log, *args)
        log_start = _size(log)
        try:
            rc, out = await run(self.reaper, argv, timeout=DEFAULT_TIMEOUT, stdio=stdio)
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"{what}: crun is not installed in the guest ({exc})") from exc
        except OSError as exc:
            raise FailedPrecondition(f"{what}: cannot run crun: {exc}") from exc
        except TimeoutError as exc:
            raise FailedPrecondition(f"{what}: crun did not finish in {DEFAULT_TIMEOUT:.0f}s") from exc
        if rc != 0:
            msg = _last_error(log, log_start) or out.decode(errors="replace").strip() or f"exit status {rc}"
            raise FailedPrecondition(
                f"{what}: crun failed: {msg}", argv=argv, exit_status=rc, container_id=container_id
            )

    def state_dir(self, container_id: str) -> Path:
        return Path(self.root) / container_id

    async def create(
        self,
        container_id: str,
        bundle: Path,
        pid_file: Path,
        log: Path,
        *,
        stdio: tuple[int | None, int | None, int | None],
        console_socket: Path | None,
    ) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self.command(
            log, *args, container_id, stdio=stdio, what="create container", container_id=container_id
        )

    async def start(self, container_id: str, log: Path) -> None:
        await self.command(log, "start", container_id, what="start container", container_id=container_id)

    async def exec(
        self,
        container_id: str,
        process_file: Path,
        pid_file: Path,
        log: Path,
        *,
        stdio: tuple[int | None, int | None, int | None],
        console_socket: Path | None,
    ) -> None:
        args = ["exec", "--detach", "--process", str(process_file), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self.command(
            log, *args, container_id, stdio=stdio, what="exec process", container_id=container_id
        )

    async def kill(self, container_id: str, sig: int, log: Path, *, all_processes: bool) -> None:
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(sig)]
        await self.command(log, *args, what="kill", container_id=container_id)

    async def simple(self, verb: Sequence[str], container_id: str, log: Path) -> None:
        await self.command(log, *verb, container_id, what=" ".join(verb), container_id=container_id)

    async def update(self, container_id: str, resources_file: Path, log: Path) -> None:
        await self.command(
            log,
            "update",
            "--resources",
            str(resources_file),
            container_id,
            what="update container",
            container_id=container_id,
        )


def _size(log: Path | None) -> int:
    try:
        return os.stat(log).st_size if log is not None else 0
    except OSError:
        return 0


def _last_error(log: Path | None, start: int) -> str:
    """The last message crun logged after offset ``start`` (JSON lines ``{"msg":, "level":}``)."""
    if log is None:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(max(start, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            return line
        if isinstance(rec, dict) and rec.get("level") in ("error", None):
            return str(rec.get("msg", line))
    return ""
