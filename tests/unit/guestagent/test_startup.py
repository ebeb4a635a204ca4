"""The agent's start-up path: what it defers so that Health answers early under TCG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shim.guestagent import guest
from shim.guestagent.__main__ import Options, parse_args


def test_no_arguments_means_the_defaults_without_argparse() -> None:
    code = (
        "import sys; from shim.guestagent.__main__ import parse_args; o = parse_args([]); "
        "print(o.port_name, 'argparse' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["io.pyvm.agent.0", "False"]


def test_arguments_parse_into_the_same_options() -> None:
    o = parse_args(["--listen", "unix:/tmp/a.sock", "--exit-io-grace", "0.5"])
    assert o == Options(listen="unix:/tmp/a.sock", exit_io_grace=0.5, log_level=o.log_level)


def test_load_modules_skips_what_is_loaded_and_tolerates_no_list(tmp_path: Path) -> None:
    assert guest.load_modules(tmp_path / "missing.list", tmp_path) == []
    lst = tmp_path / "modules.list"
    lst.write_text("kernel/fs/fuse/fuse.ko\nkernel/fs/fuse/virtiofs.ko.xz\n")
    (tmp_path / "fuse").mkdir()
    (tmp_path / "virtiofs").mkdir()
    assert guest.load_modules(lst, tmp_path) == []  # both loaded: no finit_module at all
