"""What the shim daemon (one per pod, long-lived) keeps in memory: only what its mode needs.

Each module below is MiBs of PSS per pod (shim memory budget: hack/bench-e2e.py). Checked in a fresh
interpreter, since the test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out))


def _packages(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_the_ttrpc_daemon_does_not_import_grpc_nor_the_pretty_printers() -> None:
    # grpcio (~9 MiB with its threads) only serves PYVM_SHIM_PROTOCOL=grpc; rich + pygments (5 MiB)
    # would only pretty-print console tracebacks, and the daemon logs JSON. pyroute2 (~13 MiB) wires
    # a pod's network from a helper process (shim.resources.netlink), never in the daemon.
    loaded = _packages(_modules_after("import shim.api.daemon\nimport shim.sandbox.vm"))
    assert "structlog" in loaded
    assert not loaded & {"grpc", "rich", "pygments", "better_exceptions", "pyroute2"}


def test_rich_stays_importable_after_shim_log() -> None:
    # shim.log hides rich from structlog only while importing it, not from the rest of the process
    loaded = _modules_after("import shim.log\ntry:\n import rich\nexcept ImportError:\n pass")
    try:
        import rich  # noqa: F401
    except ImportError:
        assert "rich" not in loaded
    else:
        assert "rich" in loaded
