"""Fixtures for the metrics tests; puts this directory on sys.path for ``metrics_fakes``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def run_root() -> Iterator[Path]:
    # unix socket paths must stay under 108 bytes and tmp_path can be long: use a short dir
    d = Path(tempfile.mkdtemp(prefix="pyvm-m-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
