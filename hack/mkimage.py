#!/usr/bin/env python3
"""Build a tiny OCI image tar from a static busybox, without a registry.

The tar is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``) that also carries a
docker-archive ``manifest.json`` pointing at the same blobs, so ``ctr images import`` (which reads the
``io.containerd.image.name`` annotation of ``index.json``) and docker-style importers both accept it.
The single layer is an uncompressed tar holding ``/bin/busybox``, one symlink per applet in ``/bin``,
a minimal ``/etc`` and the usual empty mount points. The output is reproducible: same inputs, same
digests (fixed mtimes, sorted entries, no compression).

Usage as a script::

    hack/mkimage.py -o busybox.tar -n pyvm.test/busybox:1 [--entrypoint ARG]... [-- CMD...]
    hack/mkimage.py -o pause.tar -n pyvm.test/pause:1 --pause

Usage from Python (tests load this file by path, ``hack`` is not a package)::

    info = build_image(Path("busybox.tar"), "pyvm.test/busybox:1", cmd=["sh"])
    info = build_pause_image(Path("pause.tar"), "pyvm.test/pause:1")
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BUSYBOX = Path("/bin/busybox")
#: the fixed mtime of every entry (2020-01-01), so digests depend only on content
EPOCH = 1577836800
#: a pause container for CRI sandboxes: sleeps forever, exits cleanly on SIGTERM/SIGINT (as PID 1 it
#: would otherwise ignore them)
PAUSE_ENTRYPOINT = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done"]

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
_MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_MT_CONFIG = "application/vnd.oci.image.config.v1+json"
_MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
_MT_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class ImageInfo:
    """What was built: the reference it is imported under and its digests (``sha256:…``)."""

    name: str
    path: Path
    manifest_digest: str
    config_digest: str
    layer_digest: str
    architecture: str


def goarch(machine: str | None = None) -> str:
    """The OCI/Go architecture name of ``machine`` (default: this host)."""
    m = machine or platform.machine()
    return _GOARCH.get(m, m)


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a.strip() for a in out.split() if a.strip() and "/" not in a and a != "busybox"})


def _layer_tar(busybox: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, EPOCH, 0, 0
            ti.uname = ti.gname = "root"
            ti.linkname = link
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "usr", "usr/bin", "var"):
            add(d, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in _applets(busybox):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add(
            "etc/passwd",
            tarfile.REGTYPE,
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(
    out: Path,
    name: str,
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = ("sh",),
    env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    busybox: Path = DEFAULT_BUSYBOX,
    architecture: str | None = None,
    working_dir: str = "/",
) -> ImageInfo:
    """Write an OCI image tar for ``name`` (a full reference such as ``pyvm.test/busybox:1``) to ``out``.

    :raises FileNotFoundError: when ``busybox`` does not exist.
    :raises subprocess.CalledProcessError: when ``busybox --list`` fails (not a busybox binary).
    """
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    arch = goarch(architecture)
    layer = _layer_tar(busybox)
    layer_digest = _digest(layer)
    config_obj: dict[str, object] = {
        "architecture": arch,
        "os": "linux",
        "created": "2020-01-01T00:00:00Z",
        "config": {
            "Env": list(env),
            "WorkingDir": working_dir,
            **({"Entrypoint": list(entrypoint)} if entrypoint else {}),
            **({"Cmd": list(cmd)} if cmd else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "pyvm hack/mkimage.py"}],
    }
    config = _json(config_obj)
    config_digest = _digest(config)
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": _MT_MANIFEST,
            "config": {"mediaType": _MT_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": _MT_LAYER, "digest": layer_digest, "size": len(layer)}],
        }
    )
    manifest_digest = _digest(manifest)
    tag = name.rsplit(":", 1)[1]
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": _MT_INDEX,
            "manifests": [
                {
                    "mediaType": _MT_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    )

    def blob(d: str) -> str:
        return "blobs/sha256/" + d.split(":", 1)[1]

    docker_manifest = _json(
        [{"Config": blob(config_digest), "RepoTags": [name], "Layers": [blob(layer_digest)]}]
    )
    files = [
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", index),
        ("manifest.json", docker_manifest),
        (blob(layer_digest), layer),
        (blob(config_digest), config),
        (blob(manifest_digest), manifest),
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(ti)
        for path, data in files:
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, EPOCH
            tar.addfile(ti, io.BytesIO(data))
    tmp.replace(out)
    return ImageInfo(name, out, manifest_digest, config_digest, layer_digest, arch)


def build_pause_image(out: Path, name: str, **kwargs: object) -> ImageInfo:
    """A CRI sandbox ("pause") image: busybox whose entrypoint sleeps until SIGTERM/SIGINT/SIGKILL."""
    return build_image(out, name, entrypoint=PAUSE_ENTRYPOINT, cmd=None, **kwargs)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True, type=Path, help="the image tar to write")
    p.add_argument("-n", "--name", required=True, help="image reference, e.g. pyvm.test/busybox:1")
    p.add_argument("--entrypoint", action="append", default=None, help="entrypoint word (repeatable)")
    p.add_argument("--pause", action="store_true", help="build a CRI pause image (sleeps forever)")
    p.add_argument("--busybox", type=Path, default=DEFAULT_BUSYBOX, help="static busybox binary")
    p.add_argument("--arch", default=None, help="architecture (default: this host)")
    p.add_argument("cmd", nargs="*", help="image Cmd (after --); default: sh")
    a = p.parse_args(argv)
    if a.pause:
        info = build_pause_image(a.output, a.name, busybox=a.busybox, architecture=a.arch)
    else:
        info = build_image(
            a.output,
            a.name,
            entrypoint=a.entrypoint,
            cmd=a.cmd or ["sh"],
            busybox=a.busybox,
            architecture=a.arch,
        )
    print(f"{info.path}: {info.name} {info.manifest_digest} ({info.architecture})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
