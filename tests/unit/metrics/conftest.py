"""Shared fixtures for the metrics tests; makes ``metrics_fakes`` importable."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def promtool_check(text: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on ``text`` (exit 0 and no lint output expected)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: install Debian's 'prometheus' package (hack/setup.sh does)")
    return subprocess.run(
        [promtool, "check", "metrics"], input=text.decode(), capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def run_root() -> Iterator[Path]:
    # unix socket paths must stay under 108 bytes and tmp_path can be long: use a short dir
    d = Path(tempfile.mkdtemp(prefix="pyvm-m-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
