"""The installer DaemonSet's program (deploy/installer/): put pyvm on this node, and take it off again.

``python -m shim.install.daemonset run`` (the container's entrypoint), on start:

1. check the host can run the copied venv (``/usr/bin/python3.11`` on the host, via nsenter);
2. copy the image's assets onto the host mounts under ``PYVM_HOST_ROOT`` (default ``/host``):
   the shim venv to ``/opt/pyvm/venv``, guest images to ``/var/lib/pyvm/guest``, the default
   configuration to ``/etc/pyvm/configuration.toml`` (only if the operator has none), links
   ``/usr/local/bin/{containerd-shim-pyvm-v2,pyvm}`` (only if absent or already ours);
3. register the runtime in the host's ``/etc/containerd/config.toml`` (``shim.install.installer``);
4. restart the host's containerd: ``nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl
   restart containerd`` (the pod has ``hostPID`` and is privileged);
5. label the node ``pyvm.io/runtime=true`` (merge patch of ``metadata.labels``);
6. ensure RuntimeClass ``pyvm`` exists (get, create on 404; 409 = another node won the race).

then sleeps until SIGTERM/SIGINT and undoes it in reverse order: unlabel; ``uninstall`` (original
bytes back); restart containerd; remove exactly the files it created (recorded in
``/opt/pyvm/installed.json``); and, if no other node still carries the label, delete the RuntimeClass.
The install steps are idempotent, so a crash-looping pod retries safely.

Kubernetes objects are only touched through the ``kubernetes`` client objects passed in, so tests can
drive this module against recorded HTTP responses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.install import containerd_config as cc
from shim.install import installer

log = logging.getLogger("pyvm.installer")

LABEL = "pyvm.io/runtime"
RUNTIME_CLASS = "pyvm"
#: measured (see the comment in deploy/runtimeclass.yaml); keep in step with it (a unit test compares them)
OVERHEAD = {"memory": "360Mi", "cpu": "20m"}
HOST_PYTHON = "/usr/bin/python3.11"
SHIM_BINARIES = ("containerd-shim-pyvm-v2", "pyvm")

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=300)


def on_host(*argv: str) -> list[str]:
    """``argv`` run in the host's namespaces (PID 1's), from a hostPID privileged pod."""
    return ["nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--", *argv]


class InstallerError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    node_name: str
    host_root: Path = Path("/host")
    #: what the image ships
    image_root: Path = Path("/opt/pyvm")
    #: paths as the host sees them
    venv: str = "/opt/pyvm/venv"
    guest_root: str = "/var/lib/pyvm/guest"
    config_path: str = "/etc/pyvm/configuration.toml"
    template_root: str = "/var/lib/pyvm/templates"
    containerd_config: str = "/etc/containerd/config.toml"
    bin_dir: str = "/usr/local/bin"
    record: str = "/opt/pyvm/installed.json"

    def host(self, path: str) -> Path:
        """``path`` (as the host sees it) inside this container's host mounts."""
        return self.host_root / path.lstrip("/")


def runtime_class_body() -> dict[str, Any]:
    return {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {
            "name": RUNTIME_CLASS,
            "labels": {"app.kubernetes.io/name": "pyvm", "app.kubernetes.io/component": "runtime"},
        },
        "handler": RUNTIME_CLASS,
        "overhead": {"podFixed": dict(OVERHEAD)},
        "scheduling": {"nodeSelector": {LABEL: "true"}},
    }


@dataclass
class NodeInstaller:
    settings: Settings
    core: Any  # kubernetes.client.CoreV1Api
    node_api: Any  # kubernetes.client.NodeV1Api
    run: Runner = _run
    #: host paths this installer created (undone on uninstall), persisted in settings.record
    created: list[str] = field(default_factory=list)

    # -- the whole thing ------------------------------------------------------------------------

    def install(self) -> None:
        self.check_host()
        self.copy_assets()
        self.build_template()
        changed = self.register_runtime()
        if changed:
            self.restart_containerd()
        self.label_node()
        self.ensure_runtime_class()
        log.info("pyvm installed on node %s", self.settings.node_name)

    def uninstall(self) -> None:
        """Undo ``install``. Every step runs even if an earlier one failed; the first error is raised."""
        errors: list[str] = []
        for step in (
            self.unlabel_node,
            self._unregister_and_restart,
            self.remove_assets,
            self.release_runtime_class,
        ):
            try:
                step()
            except Exception as exc:  # keep undoing; report at the end
                log.error("uninstall step %s failed: %s", step.__name__, exc)
                errors.append(f"{step.__name__}: {exc}")
        if errors:
            raise InstallerError("; ".join(errors))
        log.info("pyvm removed from node %s", self.settings.node_name)

    # -- host -----------------------------------------------------------------------------------

    def check_host(self) -> None:
        res = self.run(on_host("test", "-x", HOST_PYTHON))
        if res.returncode != 0:
            raise InstallerError(
                f"the host has no {HOST_PYTHON}: the copied shim venv is a Debian 12 venv and needs it. "
                f"Install python3.11 on the node (apt-get install python3.11) or keep the DaemonSet off it"
            )

    def copy_assets(self) -> None:
        s = self.settings
        self._load_record()
        venv_dst = s.host(s.venv)
        _replace_tree(s.image_root / "venv", venv_dst)
        self._created(s.venv)
        guest_src = s.image_root / "guest"
        if guest_src.is_dir():
            for arch_dir in sorted(p for p in guest_src.iterdir() if p.is_dir()):
                dst_arch = s.host(s.guest_root) / arch_dir.name
                dst_arch.mkdir(parents=True, exist_ok=True)
                for item in sorted(arch_dir.iterdir()):
                    host_path = f"{s.guest_root}/{arch_dir.name}/{item.name}"
                    target = dst_arch / item.name
                    if item.is_symlink():  # "current"
                        if target.is_symlink() or not target.exists():
                            target.unlink(missing_ok=True)
                            target.symlink_to(os.readlink(item))
                            self._created(host_path)
                    elif not target.exists():
                        _replace_tree(item, target)
                        self._created(host_path)
        cfg_src = s.image_root / "config" / "configuration.toml"
        cfg_dst = s.host(s.config_path)
        if not cfg_dst.exists() and cfg_src.is_file():
            cfg_dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cfg_src, cfg_dst)
            self._created(s.config_path)
        for name in SHIM_BINARIES:
            link = s.host(f"{s.bin_dir}/{name}")
            want = f"{s.venv}/bin/{name}"
            if link.is_symlink() and os.readlink(link) == want:
                self._created(f"{s.bin_dir}/{name}")
                continue
            if link.exists() or link.is_symlink():
                log.warning("%s exists and is not ours; leaving it (the shim is at %s)", link, want)
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(want)
            self._created(f"{s.bin_dir}/{name}")
        self._save_record()

    def build_template(self) -> None:
        """The node's VM template (pods restore it instead of cold-booting), built on the host with
        the copied venv; a no-op when up to date. A failure is logged, not fatal: pods boot cold."""
        s = self.settings
        existed = s.host(s.template_root).exists()
        pyvm = f"{s.venv}/bin/pyvm"
        # one per vCPU count up to the node's CPUs: CRI pods with CPU limits are sized that way
        variants = ("--vcpus", "all")
        res = self.run(on_host(pyvm, "template", "build", "--config", s.config_path, *variants))
        if res.returncode != 0:
            log.warning(
                "building the VM template failed (exit %s): %s; pods will cold-boot",
                res.returncode,
                (res.stderr or res.stdout).strip()[-2000:],
            )
            return
        log.info("%s", res.stdout.strip())
        self.run(on_host(pyvm, "template", "rm", "--config", s.config_path, *variants))  # drop stale ones
        if not existed:
            self._created(s.template_root)
            self._save_record()

    def remove_assets(self) -> None:
        s = self.settings
        self._load_record()
        for host_path in reversed(self.created):
            p = s.host(host_path)
            if p.is_symlink() or p.is_file():
                p.unlink(missing_ok=True)
            elif p.is_dir():
                shutil.rmtree(p)
        self.created.clear()
        s.host(s.record).unlink(missing_ok=True)

    def register_runtime(self) -> bool:
        s = self.settings
        entry = cc.RuntimeEntry(config_path=s.config_path)
        outcome = installer.install(s.host(s.containerd_config), entry)
        for line in outcome.messages:
            log.info("%s", line)
        return outcome.changed

    def _unregister_and_restart(self) -> None:
        s = self.settings
        outcome = installer.uninstall(s.host(s.containerd_config))
        for line in outcome.messages:
            log.info("%s", line)
        if outcome.changed:
            self.restart_containerd()

    def restart_containerd(self) -> None:
        res = self.run(on_host("systemctl", "restart", "containerd"))
        if res.returncode != 0:
            raise InstallerError(
                f"restarting containerd on the host failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()}; is containerd a systemd unit on this node?"
            )
        log.info("restarted containerd on the host")

    # -- Kubernetes -----------------------------------------------------------------------------

    def label_node(self) -> None:
        self.core.patch_node(
            self.settings.node_name,
            {"metadata": {"labels": {LABEL: "true"}}},
            _content_type="application/merge-patch+json",
        )

    def unlabel_node(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_node(
                self.settings.node_name,
                {"metadata": {"labels": {LABEL: None}}},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ensure_runtime_class(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.node_api.read_runtime_class(RUNTIME_CLASS)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            self.node_api.create_runtime_class(runtime_class_body())
            log.info("created RuntimeClass %s", RUNTIME_CLASS)
        except ApiException as exc:
            if exc.status != 409:  # another node created it meanwhile
                raise

    def release_runtime_class(self) -> None:
        """Delete the RuntimeClass if no other node is still labelled (we unlabelled ourselves first)."""
        from kubernetes.client.exceptions import ApiException

        nodes = self.core.list_node(label_selector=f"{LABEL}=true")
        others = [n.metadata.name for n in nodes.items if n.metadata.name != self.settings.node_name]
        if others:
            log.info("RuntimeClass %s kept: still installed on %s", RUNTIME_CLASS, ", ".join(sorted(others)))
            return
        try:
            self.node_api.delete_runtime_class(RUNTIME_CLASS)
            log.info("deleted RuntimeClass %s (last node)", RUNTIME_CLASS)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- record ---------------------------------------------------------------------------------

    def _created(self, host_path: str) -> None:
        if host_path not in self.created:
            self.created.append(host_path)

    def _load_record(self) -> None:
        try:
            data = json.loads(self.settings.host(self.settings.record).read_text())
            for p in data.get("created", []):
                self._created(str(p))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable install record: %s", exc)

    def _save_record(self) -> None:
        path = self.settings.host(self.settings.record)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"created": self.created}, indent=2) + "\n")


def _replace_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, replacing an older copy (symlinks kept as symlinks)."""
    tmp = dst.with_name(dst.name + ".pyvm-new")
    if tmp.exists():
        shutil.rmtree(tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, symlinks=True)
    if dst.exists():
        old = dst.with_name(dst.name + ".pyvm-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dst)


def _clients() -> tuple[Any, Any]:
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CoreV1Api(), client.NodeV1Api()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyvm-installer", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "action", choices=("run", "install", "uninstall"), help="run = install, wait, uninstall"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    node = os.environ.get("NODE_NAME")
    if not node:
        print("pyvm-installer: NODE_NAME is not set (use the downward API: spec.nodeName)", file=sys.stderr)
        return 2
    settings = Settings(node_name=node, host_root=Path(os.environ.get("PYVM_HOST_ROOT", "/host")))
    core, node_api = _clients()
    inst = NodeInstaller(settings, core, node_api)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if args.action in ("run", "install"):
            inst.install()
        if args.action == "run":
            stop.wait()
            log.info("signal received: uninstalling")
        if args.action in ("run", "uninstall"):
            inst.uninstall()
    except Exception as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
