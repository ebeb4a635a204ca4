"""Which pod (sandbox, i.e. VM) a container belongs to, from its OCI spec's CRI annotations.

Used by ``start`` (one shim per pod) and by ``delete`` (which sandbox's state to clean). Imports
only the standard library: it is on the ``start`` command's cold path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
TYPE_SANDBOX = "sandbox"
TYPE_CONTAINER = "container"


@dataclass(frozen=True)
class PodMembership:
    """``sandbox_id`` is the group key: the pod's sandbox id, or the container's own id."""

    container_id: str
    sandbox_id: str

    @property
    def is_sandbox(self) -> bool:
        return self.container_id == self.sandbox_id


def membership(container_id: str, annotations: Mapping[str, str]) -> PodMembership:
    """An app container (``container-type=container``) joins ``sandbox-id``; anything else
    (the pause container, a plain ``ctr run`` container) is its own sandbox (Kata's rule)."""
    if annotations.get(CONTAINER_TYPE) == TYPE_CONTAINER and annotations.get(SANDBOX_ID):
        return PodMembership(container_id, annotations[SANDBOX_ID])
    return PodMembership(container_id, container_id)


def read_annotations(bundle: str | Path) -> dict[str, str]:
    """Annotations of ``<bundle>/config.json``; ``{}`` if the file is missing or has none.

    :raises ValueError: when config.json exists but is not valid JSON.
    """
    try:
        with open(Path(bundle) / "config.json", "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        return {}
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def bundle_membership(container_id: str, bundle: str | Path) -> PodMembership:
    return membership(container_id, read_annotations(bundle))


__all__ = [
    "CONTAINER_TYPE",
    "SANDBOX_ID",
    "PodMembership",
    "bundle_membership",
    "membership",
    "read_annotations",
]
