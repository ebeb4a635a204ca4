"""``shim.paths``: socket path limits, the shim socket dir override, post-mortem location."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import paths
from shim.errors import Code, FailedPrecondition, code_of
from shim.paths import SandboxDir

CRI_ID = "a" * 64  # CRI sandbox ids are 64 hex characters


def test_socket_paths_that_fit_pass() -> None:
    SandboxDir.for_sandbox(CRI_ID, base=Path("/run/pyvm/sbs")).check_socket_paths()


def test_run_root_too_long_for_a_cri_sandbox_is_refused_naming_path_length_and_limit() -> None:
    # regression: virtiofsd died "Socket path too long" and Create failed obscurely
    base = Path("/tmp/pyvm-e2e-abcdefgh/some/longer/run/root/sbs")
    sd = SandboxDir.for_sandbox(CRI_ID, base=base)
    with pytest.raises(FailedPrecondition) as info:
        sd.check_socket_paths()
    err = info.value
    longest = max(sd.sockets, key=lambda p: len(str(p)))
    assert str(longest) in err.message
    assert f"{len(str(longest))} bytes" in err.message
    assert str(paths.UNIX_PATH_MAX) in err.message and "PYVM_RUN_ROOT" in err.message
    assert err.facts == {"path": str(longest), "length": len(str(longest)), "limit": 107}
    assert code_of(err) == Code.FAILED_PRECONDITION


def test_the_limit_is_the_kernels_sun_path() -> None:
    """107 bytes pass, 108 do not (sun_path holds 108 bytes with the NUL): checked with a real bind."""
    import socket
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="p", dir="/tmp"))
    try:
        for n, ok in ((paths.UNIX_PATH_MAX, True), (paths.UNIX_PATH_MAX + 1, False)):
            p = d / ("x" * (n - len(str(d)) - 1))
            assert len(str(p)) == n
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(str(p))
                assert ok
            except OSError:
                assert not ok
            finally:
                s.close()
                p.unlink(missing_ok=True)
    finally:
        d.rmdir()


def test_every_socket_is_checked() -> None:
    sd = SandboxDir.for_sandbox("sb", base=Path("/r/sbs"))
    names = {p.name for p in sd.sockets}
    assert names == {
        "qmp.sock",
        "agent.sock",
        "guest-log.sock",
        "virtiofsd.sock",
        "metrics.sock",
        "console.sock",
    }
    assert all(p.parent == sd.root for p in sd.sockets)


def test_shim_socket_dir_honours_the_override_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.SHIM_SOCKET_DIR_ENV, raising=False)
    assert paths.shim_socket_dir() == Path("/run/containerd/s") == paths.SHIM_SOCKET_DIR
    monkeypatch.setenv("PYVM_SHIM_SOCKET_DIR", "/tmp/s")
    assert paths.shim_socket_dir() == Path("/tmp/s")  # read at call time, not import time
    from shim.api import bootstrap

    assert bootstrap.socket_dir() == Path("/tmp/s")
    assert bootstrap.SOCKET_DIR_ENV == paths.SHIM_SOCKET_DIR_ENV == "PYVM_SHIM_SOCKET_DIR"


def test_postmortem_is_a_sibling_of_sbs() -> None:
    sd = SandboxDir.for_sandbox("sb1", base=Path("/run/pyvm/sbs"))
    assert sd.postmortem == Path("/run/pyvm/postmortem/sb1")
    assert sd.postmortem_root == Path("/run/pyvm/postmortem")
