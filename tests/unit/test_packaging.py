"""`pip install .` must ship the generated protobuf code and both console scripts."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_carries_generated_protobuf_code_and_entry_points(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("pyvm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    generated = {p.relative_to(REPO).as_posix() for p in (REPO / "shim" / "_pb").rglob("*_pb2.py")}
    assert generated and generated <= names, sorted(generated - names)
    assert "shim/guestagent/__main__.py" in names and "shim/py.typed" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "containerd-shim-pyvm-v2 = shim.cli.shim_main:main" in entry
    assert "pyvm = shim.cli.pyvm:main" in entry
