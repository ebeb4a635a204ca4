"""Running the host tools the builder needs (apt, dpkg, debootstrap, mkfs), with readable failures."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from shim.errors import FailedPrecondition, Internal


def need_tool(name: str, package: str) -> str:
    """Path of ``name``. :raises FailedPrecondition: naming the Debian package to install."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise FailedPrecondition(f"{name} not found: apt-get install {package}", tool=name)
    return path


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    capture: bool = True,
) -> str:
    """Run ``argv``; return its stdout.

    :raises Internal: when it exits non-zero, with the argv and the tail of its output.
    """
    args = [str(a) for a in argv]
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-3000:]
        raise Internal(
            f"{args[0]} failed with exit code {proc.returncode}: {' '.join(args)}\n{tail}",
            argv=args,
            exit_code=proc.returncode,
            output_tail=tail,
        )
    return proc.stdout or ""
