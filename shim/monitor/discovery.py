"""Find running sandboxes: ``<run root>/sbs/<id>/metrics.sock``, plus CRI names from ``state.json``.

A sandbox is "running" for the monitor when its metrics socket exists; a socket left behind by a
crashed shim is found too and shows up as a failed scrape, which is what an operator should see.
"""

from __future__ import annotations

import json
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shim.errors import InvalidArgument
from shim.log import get_logger
from shim.paths import SandboxDir, run_root

_log = get_logger("shim.monitor.discovery")

ANN_UID = "io.kubernetes.cri.sandbox-uid"
ANN_NAME = "io.kubernetes.cri.sandbox-name"
ANN_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
MAX_STATE_BYTES = 4 << 20


@dataclass(frozen=True)
class SandboxTarget:
    sandbox_id: str
    metrics_sock: Path
    cri_uid: str = ""
    cri_name: str = ""
    cri_namespace: str = ""

    def labels(self) -> dict[str, str]:
        """Labels the monitor adds to every sample of this sandbox (empty ones left out)."""
        out = {
            "sandbox_id": self.sandbox_id,
            "cri_uid": self.cri_uid,
            "cri_name": self.cri_name,
            "cri_namespace": self.cri_namespace,
        }
        return {k: v for k, v in out.items() if v}

    def as_json(self) -> dict[str, str]:
        d = asdict(self)
        d["metrics_sock"] = str(self.metrics_sock)
        return d


def _find_annotations(state: Any) -> dict[str, Any]:
    """``annotations`` at the top of state.json, or one level down (``{"sandbox": {"annotations":..}}``,
    ``{"spec": {"annotations": ..}}``); the shim engineer owns the format, so read it loosely."""
    if not isinstance(state, dict):
        return {}
    ann = state.get("annotations")
    if isinstance(ann, dict) and ann:
        return ann
    for value in state.values():
        if isinstance(value, dict):
            ann = value.get("annotations")
            if isinstance(ann, dict) and ann:
                return ann
    return {}


def read_cri_annotations(state_json: Path) -> dict[str, str]:
    """CRI pod uid/name/namespace from a sandbox's state.json; ``{}`` if absent or unreadable."""
    try:
        with state_json.open("rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except OSError:
        return {}
    if len(raw) > MAX_STATE_BYTES:
        _log.warning("state.json too large, ignored", path=str(state_json))
        return {}
    try:
        ann = _find_annotations(json.loads(raw))
    except ValueError:
        # the shim may be rewriting it right now; the next scrape will see the new one
        return {}
    out = {}
    for key, label in ((ANN_UID, "cri_uid"), (ANN_NAME, "cri_name"), (ANN_NAMESPACE, "cri_namespace")):
        value = ann.get(key)
        if isinstance(value, str):
            out[label] = value
    return out


def discover(root: Path | None = None) -> list[SandboxTarget]:
    """Every sandbox under ``<root>/sbs`` with a metrics socket, sorted by id.

    ``root`` defaults to ``shim.paths.run_root()`` (``PYVM_RUN_ROOT`` overrides it). Never raises for
    a missing or unreadable directory: no sandboxes.
    """
    base = (root if root is not None else run_root()) / "sbs"
    try:
        entries = sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return []
    out: list[SandboxTarget] = []
    for entry in entries:
        try:
            sbd = SandboxDir.for_sandbox(entry.name, base=base)
        except InvalidArgument:
            continue  # not a valid sandbox id: not ours
        try:
            if not stat.S_ISSOCK(sbd.metrics_sock.stat().st_mode):
                continue
        except OSError:
            continue
        out.append(SandboxTarget(sbd.sandbox_id, sbd.metrics_sock, **read_cri_annotations(sbd.state_json)))
    return out


__all__ = ["SandboxTarget", "discover", "read_cri_annotations"]
