"""A private containerd 1.6 with its CRI plugin, driven the way kubelet drives it.

What the harness sets up (everything below one temp dir, ``workdir``), and why:

- a named network namespace ``pyvm-test-<rand>`` (``ip netns add``; ``lo`` up). containerd runs in it
  through ``nsenter --net=`` only, so it shares the host's *mount* namespace: the test process sees
  every mount containerd and its shims make (``ip netns exec`` would give it a private mount namespace).
  CNI's host-side veths and routes land in this netns, never on the host.
- a real CNI network (Debian's ``ptp`` + ``host-local`` from ``/usr/lib/cni``, a private /24, no
  default route, IPAM state under ``workdir``): containerd 1.6 CRI refuses loopback-only networking
  ("failed to find network info for sandbox").
- ``restrict_oom_score_adj = true``: these hosts lack CAP_SYS_RESOURCE; without it pod creation fails.
- ``sandbox_image`` = a pause image built from busybox by ``hack/mkimage.py`` and imported into
  namespace ``k8s.io`` (no registry is reachable); a busybox image (``BUSYBOX_IMAGE``) for app
  containers. snapshotter ``overlayfs``.
- runtimes: ``runc`` (default, handler ``""`` or ``"runc"``) and ``pyvm``
  (``runtime_type = "io.containerd.pyvm.v2"``, ``pod_annotations = ["io.pyvm.*"]``, options
  ``ConfigPath`` = the ``pyvm_config_path`` given by the caller). containerd finds
  ``containerd-shim-pyvm-v2`` on its ``PATH``: pass the directory holding it as ``shim_dirs``.

Use::

    with CriContainerd(tmp_path, pyvm_config_path=cfg, shim_dirs=[bindir]) as cri:
        pod = cri.client.run_pod_sandbox(cri.pod_config("p1"), runtime_handler="pyvm")
        ctr = cri.client.create_and_start(pod, cri.container_config("c1", ["sleep", "3600"]), cri.last_pod_config)
        res = cri.client.exec_sync(ctr, ["echo", "hi"])

Teardown (``stop()``, also on ``__exit__`` and when ``start()`` fails half way) stops and removes
every pod through CRI, stops containerd (SIGTERM, then SIGKILL), kills shims and container processes
it left (found by the containerd address on their command line and by the pod cgroups), unmounts
whatever is still mounted under ``workdir`` and the pod netns files CRI made, removes the pod cgroups,
the netns, CNI cache files and ``workdir``. ``leftovers()`` says what is still there (tests assert it
is empty). Every step is logged to ``workdir/harness.log`` before ``workdir`` is removed... so keep
``keep_workdir=True`` while debugging.

The helper needs root, ``containerd`` 1.6, ``ctr``, ``runc``, ``ip``, ``nsenter`` and ``/usr/lib/cni``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from tests.helpers.pyvm_vm import mounts_under, unescape_mountinfo

log = logging.getLogger("pyvm.tests.cri")

REPO = Path(__file__).resolve().parents[2]
CNI_BIN_DIR = Path("/usr/lib/cni")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "pyvm.test/pause:1"
BUSYBOX_IMAGE = "pyvm.test/busybox:1"
PYVM_RUNTIME_TYPE = "io.containerd.pyvm.v2"
#: CRI RPC deadline; pod creation under TCG VMs can take tens of seconds, give it room
DEFAULT_TIMEOUT = 120.0


def load_mkimage() -> Any:
    """``hack/mkimage.py`` as a module (``hack`` is not a package)."""
    name = "pyvm_hack_mkimage"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "hack" / "mkimage.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def missing_prerequisites() -> list[str]:
    """What this host lacks to run the harness (empty when it can run)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("containerd", "ctr", "runc", "ip", "nsenter", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            missing.append(tool)
    for plugin in ("ptp", "host-local", "loopback"):
        if not (CNI_BIN_DIR / plugin).exists():
            missing.append(str(CNI_BIN_DIR / plugin))
    if not Path("/bin/busybox").exists():
        missing.append("/bin/busybox (busybox-static)")
    return missing


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


class CriClient:
    """Thin synchronous wrapper over the CRI v1 RuntimeService/ImageService stubs.

    Methods take and return the ``cri_api.v1.api_pb2`` messages (or ids), one RPC each, as kubelet
    issues them. gRPC errors propagate as ``grpc.RpcError`` (``.code()``, ``.details()``).
    """

    def __init__(self, socket: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = socket
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # runtime / status
    def version(self, timeout: float | None = 5) -> cri.VersionResponse:
        return self.runtime.Version(cri.VersionRequest(version="v1"), timeout=self._t(timeout))

    def status(self, timeout: float | None = 5) -> cri.StatusResponse:
        return self.runtime.Status(cri.StatusRequest(verbose=False), timeout=self._t(timeout))

    # pods
    def run_pod_sandbox(
        self, config: cri.PodSandboxConfig, runtime_handler: str = "", timeout: float | None = None
    ) -> str:
        req = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self.runtime.RunPodSandbox(req, timeout=self._t(timeout)).pod_sandbox_id

    def stop_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self._t(timeout)
        )

    def remove_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self._t(timeout)
        )

    def pod_sandbox_status(
        self, pod_id: str, verbose: bool = False, timeout: float | None = None
    ) -> cri.PodSandboxStatusResponse:
        req = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self.runtime.PodSandboxStatus(req, timeout=self._t(timeout))

    def list_pod_sandbox(self, timeout: float | None = None) -> list[cri.PodSandbox]:
        return list(self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=self._t(timeout)).items)

    # containers
    def create_container(
        self,
        pod_id: str,
        config: cri.ContainerConfig,
        sandbox_config: cri.PodSandboxConfig,
        timeout: float | None = None,
    ) -> str:
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config)
        return self.runtime.CreateContainer(req, timeout=self._t(timeout)).container_id

    def start_container(self, container_id: str, timeout: float | None = None) -> None:
        self.runtime.StartContainer(
            cri.StartContainerRequest(container_id=container_id), timeout=self._t(timeout)
        )

    def create_and_start(
        self, pod_id: str, config: cri.ContainerConfig, sandbox_config: cri.PodSandboxConfig
    ) -> str:
        cid = self.create_container(pod_id, config, sandbox_config)
        self.start_container(cid)
        return cid

    def stop_container(self, container_id: str, grace: int = 0, timeout: float | None = None) -> None:
        req = cri.StopContainerRequest(container_id=container_id, timeout=grace)
        self.runtime.StopContainer(req, timeout=self._t(timeout))

    def remove_container(self, container_id: str, timeout: float | None = None) -> None:
        self.runtime.RemoveContainer(
            cri.RemoveContainerRequest(container_id=container_id), timeout=self._t(timeout)
        )

    def container_status(
        self, container_id: str, verbose: bool = False, timeout: float | None = None
    ) -> cri.ContainerStatusResponse:
        req = cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self.runtime.ContainerStatus(req, timeout=self._t(timeout))

    def list_containers(self, pod_id: str | None = None, timeout: float | None = None) -> list[cri.Container]:
        flt = cri.ContainerFilter(pod_sandbox_id=pod_id) if pod_id else None
        req = cri.ListContainersRequest(filter=flt)
        return list(self.runtime.ListContainers(req, timeout=self._t(timeout)).containers)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 30) -> ExecResult:
        """ExecSync with CRI's own ``timeout`` (seconds) and a gRPC deadline a bit longer."""
        req = cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        resp = self.runtime.ExecSync(req, timeout=timeout + 30)
        return ExecResult(resp.stdout, resp.stderr, resp.exit_code)

    def container_stats(self, container_id: str, timeout: float | None = None) -> cri.ContainerStats:
        req = cri.ContainerStatsRequest(container_id=container_id)
        return self.runtime.ContainerStats(req, timeout=self._t(timeout)).stats

    def list_container_stats(self, timeout: float | None = None) -> list[cri.ContainerStats]:
        req = cri.ListContainerStatsRequest()
        return list(self.runtime.ListContainerStats(req, timeout=self._t(timeout)).stats)

    def update_container_resources(
        self, container_id: str, linux: cri.LinuxContainerResources, timeout: float | None = None
    ) -> None:
        req = cri.UpdateContainerResourcesRequest(container_id=container_id, linux=linux)
        self.runtime.UpdateContainerResources(req, timeout=self._t(timeout))

    # images
    def image_status(self, ref: str, timeout: float | None = 10) -> cri.ImageStatusResponse:
        req = cri.ImageStatusRequest(image=cri.ImageSpec(image=ref))
        return self.images.ImageStatus(req, timeout=self._t(timeout))

    def list_images(self, timeout: float | None = 10) -> list[cri.Image]:
        return list(self.images.ListImages(cri.ListImagesRequest(), timeout=self._t(timeout)).images)


def _namespace_options(share_pid: bool) -> cri.NamespaceOption:
    """kubelet's: network and IPC per pod; PID per container, or per pod for shareProcessNamespace."""
    return cri.NamespaceOption(network=cri.POD, pid=cri.POD if share_pid else cri.CONTAINER, ipc=cri.POD)


def linux_resources(
    *,
    memory_limit: int = 0,
    cpu_quota: int = 0,
    cpu_period: int = 100_000,
    cpu_shares: int = 2,
    oom_score_adj: int = 1000,
) -> cri.LinuxContainerResources:
    """LinuxContainerResources as kubelet fills them (BestEffort defaults: shares 2, oom_score_adj 1000)."""
    return cri.LinuxContainerResources(
        cpu_period=cpu_period,
        cpu_quota=cpu_quota,
        cpu_shares=cpu_shares,
        memory_limit_in_bytes=memory_limit,
        oom_score_adj=oom_score_adj,
    )


class CriContainerd:
    """One private containerd with CRI in its own netns; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        pyvm_config_path: Path | None = None,
        shim_dirs: Iterable[Path] = (),
        env: dict[str, str] | None = None,
        log_level: str = "debug",
        keep_workdir: bool = False,
        config_factory: Callable[[CriContainerd], str] | None = None,
    ) -> None:
        self.tag = secrets.token_hex(4)
        self.name = f"pyvm-test-{self.tag}"
        self.workdir = Path(workdir).resolve() / self.name
        self.pyvm_config_path = pyvm_config_path
        self.shim_dirs = [Path(p) for p in shim_dirs]
        self.extra_env = dict(env or {})
        self.log_level = log_level
        self.keep_workdir = keep_workdir
        #: builds containerd's config text instead of :meth:`render_config` (called once the harness
        #: dirs exist, before containerd starts; it may write ``config_path`` itself, e.g. to run
        #: ``pyvm install`` on it); it must use this harness's root, state, socket and CNI dirs
        self.config_factory = config_factory
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.socket = self.workdir / "containerd.sock"
        self.config_path = self.workdir / "config.toml"
        self.cni_conf_dir = self.workdir / "cni" / "net.d"
        self.cni_ipam_dir = self.workdir / "cni" / "ipam"
        self.pod_logs = self.workdir / "pods"
        self.log_path = self.workdir / "containerd.log"
        self.netns = self.name
        #: pods run with cgroup_parent under this (cgroupfs driver), removed on teardown
        self.cgroup_parent = f"/{self.name}"
        #: a private /24; only ever routed inside the harness netns
        self.subnet = f"10.213.{int(self.tag[:2], 16)}.0/24"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CriClient = None  # type: ignore[assignment]
        self.last_pod_config: cri.PodSandboxConfig | None = None
        self._pod_netns: set[Path] = set()
        self._netns_before: set[str] = set()
        self._netns_created = False

    # lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> CriContainerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create the netns and dirs, start containerd, import the images, wait for CRI ready.

        On any failure everything done so far is torn down before the exception propagates.
        """
        try:
            self._netns_before = _list_netns()
            for d in (
                self.root,
                self.state,
                self.cni_conf_dir,
                self.cni_ipam_dir,
                self.pod_logs,
                self.workdir / "tmp",
            ):
                d.mkdir(parents=True, exist_ok=True)
            _run(["ip", "netns", "add", self.netns])
            self._netns_created = True
            _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
            text = self.config_factory(self) if self.config_factory else self.render_config()
            self.config_path.write_text(text)
            (self.cni_conf_dir / "10-pyvm-test.conflist").write_text(json.dumps(self.cni_config(), indent=2))
            mk = load_mkimage()
            images = self.workdir / "images"
            mk.build_pause_image(images / "pause.tar", PAUSE_IMAGE)
            mk.build_image(images / "busybox.tar", BUSYBOX_IMAGE, cmd=["sh"])
            self.start_containerd()
            for tar in ("pause.tar", "busybox.tar"):
                self.ctr("images", "import", str(images / tar))
            self._wait_images([PAUSE_IMAGE, BUSYBOX_IMAGE])
        except BaseException:
            log.exception("CRI harness start failed; tearing down")
            self._dump_log_tail()
            self.stop()
            raise

    def start_containerd(self, timeout: float = 60) -> None:
        """Start (or restart) only the containerd process and wait until CRI reports ready."""
        env = {
            "PATH": ":".join(
                [*map(str, self.shim_dirs), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
            ),
            "TMPDIR": str(self.workdir / "tmp"),
            "HOME": str(self.workdir),
            **self.extra_env,
        }
        logf = open(self.log_path, "ab")  # handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={NETNS_DIR / self.netns}",
                    "--",
                    "containerd",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            logf.close()
        self.client = CriClient(self.socket)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    conds = {c.type: c.status for c in self.client.status().status.conditions}
                    if conds.get("RuntimeReady") and conds.get("NetworkReady"):
                        return
                    last = conds
                except grpc.RpcError as exc:
                    last = exc
            time.sleep(0.2)
        raise TimeoutError(f"CRI not ready after {timeout}s (last: {last}):\n{self.log_tail()}")

    def stop_containerd(self, timeout: float = 15) -> None:
        """Stop the containerd process only (pods and shims keep running), e.g. to test a restart."""
        if self.client is not None:
            self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("containerd ignored SIGTERM for %ss; killing it", timeout)
            self.proc.kill()
            self.proc.wait(10)

    def restart_containerd(self) -> None:
        self.stop_containerd()
        self.start_containerd()

    def stop(self) -> None:
        """Tear everything down; idempotent and best effort (every step runs even if one fails)."""
        steps = [
            ("remove pods", self._remove_all_pods),
            ("stop containerd", self.stop_containerd),
            ("kill leftover processes", self._kill_leftovers),
            ("unmount leftovers", self._unmount_leftovers),
            ("remove pod netns", self._remove_pod_netns),
            ("remove cgroups", self._remove_cgroups),
            ("remove shim sockets", self._remove_shim_sockets),
            ("delete netns", self._delete_netns),
            ("remove files", self._remove_files),
        ]
        for what, fn in steps:
            try:
                fn()
            except Exception:
                log.exception("CRI harness teardown: %s failed", what)

    # configuration ------------------------------------------------------------------------------
    def render_config(self) -> str:
        cri_p = 'plugins."io.containerd.grpc.v1.cri"'
        pyvm_opts = ""
        if self.pyvm_config_path is not None:
            pyvm_opts = f"""
[{cri_p}.containerd.runtimes.pyvm.options]
  ConfigPath = {json.dumps(str(self.pyvm_config_path))}
"""
        return f"""version = 2
root = {json.dumps(str(self.root))}
state = {json.dumps(str(self.state))}
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = {json.dumps(str(self.socket))}

[debug]
  level = {json.dumps(self.log_level)}

[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(str(self.workdir / "opt"))}

[{cri_p}]
  sandbox_image = {json.dumps(PAUSE_IMAGE)}
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri_p}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri_p}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri_p}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri_p}.containerd.runtimes.pyvm]
  runtime_type = {json.dumps(PYVM_RUNTIME_TYPE)}
  pod_annotations = ["io.pyvm.*"]
  privileged_without_host_devices = true
{pyvm_opts}
[{cri_p}.cni]
  bin_dir = {json.dumps(str(CNI_BIN_DIR))}
  conf_dir = {json.dumps(str(self.cni_conf_dir))}
  max_conf_num = 1
"""

    def cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "0.4.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "subnet": self.subnet,
                        "routes": [],
                        "dataDir": str(self.cni_ipam_dir),
                    },
                }
            ],
        }

    # helpers for tests --------------------------------------------------------------------------
    def ctr(self, *args: str, namespace: str = "k8s.io", check: bool = True, timeout: float = 120) -> str:
        """Run ``ctr`` against this containerd; returns stdout."""
        argv = ["ctr", "--address", str(self.socket), "--namespace", namespace, *args]
        return _run(argv, check=check, timeout=timeout).stdout

    def netns_exec(self, *argv: str, check: bool = True) -> str:
        """Run a command in the harness netns (same mount namespace)."""
        return _run(["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv], check=check).stdout

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def pod_config(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str | None = None,
        attempt: int = 0,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        hostname: str | None = None,
        share_pid: bool = False,
    ) -> cri.PodSandboxConfig:
        """A PodSandboxConfig like kubelet's (cgroupfs driver): metadata, log dir, cgroup parent,
        namespace options (network/ipc per pod, pid per container unless ``share_pid``: a pod with
        ``shareProcessNamespace``), runtime/default seccomp off."""
        uid = uid or str(uuid.uuid4())
        log_dir = self.pod_logs / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        ns_opts = _namespace_options(share_pid)
        cfg = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
            hostname=hostname or name,
            log_directory=str(log_dir),
            labels={
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": namespace,
                **(labels or {}),
            },
            annotations=dict(annotations or {}),
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.cgroup_parent}/pod{uid}",
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns_opts),
            ),
        )
        self.last_pod_config = cfg
        return cfg

    def container_config(
        self,
        name: str,
        command: Sequence[str] | None = None,
        args: Sequence[str] = (),
        *,
        image: str = BUSYBOX_IMAGE,
        memory_limit: int = 0,
        env: dict[str, str] | None = None,
        mounts: Sequence[cri.Mount] = (),
        annotations: dict[str, str] | None = None,
        attempt: int = 0,
        share_pid: bool = False,
    ) -> cri.ContainerConfig:
        """A ContainerConfig like kubelet's: image, command/args, log path, resources, namespaces
        (``share_pid``: the pod's pid namespace, as kubelet asks for ``shareProcessNamespace``)."""
        ns_opts = _namespace_options(share_pid)
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=attempt),
            image=cri.ImageSpec(image=image),
            command=list(command or []),
            args=list(args),
            envs=[cri.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            mounts=list(mounts),
            log_path=f"{name}/{attempt}.log",
            labels={"io.kubernetes.container.name": name},
            annotations=dict(annotations or {}),
            linux=cri.LinuxContainerConfig(
                resources=linux_resources(memory_limit=memory_limit),
                security_context=cri.LinuxContainerSecurityContext(namespace_options=ns_opts),
            ),
        )

    def run_pod(
        self, name: str, runtime_handler: str = "", **kwargs: Any
    ) -> tuple[str, cri.PodSandboxConfig]:
        """RunPodSandbox with :meth:`pod_config`; remembers the pod's netns for teardown."""
        cfg = self.pod_config(name, **kwargs)
        pod_id = self.client.run_pod_sandbox(cfg, runtime_handler=runtime_handler)
        self._remember_netns(pod_id)
        return pod_id, cfg

    def pod_cgroup_dirs(self) -> list[Path]:
        """Every cgroup directory under the harness cgroup parent, in every mounted hierarchy."""
        out = []
        for hier in _cgroup_hierarchies():
            base = hier / self.cgroup_parent.lstrip("/")
            if base.exists():
                out.extend(sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)))
                out.append(base)
        return out

    def leftovers(self) -> list[str]:
        """What this harness left behind (empty after a clean teardown)."""
        found = []
        for m in mounts_under(self.workdir):
            found.append(f"mount {m}")
        for p in self._pod_netns:
            if p.exists():
                found.append(f"pod netns {p}")
        if self.netns in _list_netns():
            found.append(f"netns {self.netns}")
        for pid, cmd in _procs_mentioning(str(self.socket)):
            found.append(f"process {pid}: {cmd}")
        for d in self.pod_cgroup_dirs():
            found.append(f"cgroup {d}")
        if self.workdir.exists() and not self.keep_workdir:
            found.append(f"dir {self.workdir}")
        return found

    # internals ----------------------------------------------------------------------------------
    def _remember_netns(self, pod_id: str) -> None:
        try:
            info = json.loads(self.client.pod_sandbox_status(pod_id, verbose=True).info.get("info", "{}"))
            for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
                if ns.get("type") == "network" and ns.get("path"):
                    self._pod_netns.add(Path(ns["path"]))
        except (grpc.RpcError, ValueError):
            log.warning("could not read the netns of pod %s", pod_id, exc_info=True)

    def _wait_images(self, refs: Sequence[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        pending = list(refs)
        while pending and time.monotonic() < deadline:
            pending = [r for r in pending if not self.client.image_status(r).HasField("image")]
            if pending:
                time.sleep(0.2)
        if pending:
            raise TimeoutError(f"CRI does not see imported images {pending}")

    def _remove_all_pods(self) -> None:
        if self.proc is None or self.proc.poll() is not None or self.client is None:
            return
        for c in self.client.list_containers():
            with contextlib.suppress(grpc.RpcError):
                self.client.stop_container(c.id, timeout=60)
            with contextlib.suppress(grpc.RpcError):
                self.client.remove_container(c.id, timeout=60)
        for p in self.client.list_pod_sandbox():
            self._remember_netns(p.id)
            try:
                self.client.stop_pod_sandbox(p.id, timeout=120)
                self.client.remove_pod_sandbox(p.id, timeout=120)
            except grpc.RpcError as exc:
                log.warning("removing pod %s failed: %s", p.id, exc)
        # a removed pod's shim still cleans up (VM, mounts) before it exits: killing it later as a
        # leftover would leave what it had not removed yet
        deadline = time.monotonic() + 30
        while {pid for pid, _ in _procs_mentioning(str(self.socket))} - {self.proc.pid}:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)

    def _shim_sockets(self) -> list[Path]:
        socks = []
        task_dir = self.state / "io.containerd.runtime.v2.task"
        for addr in task_dir.glob("*/*/address") if task_dir.exists() else []:
            with contextlib.suppress(OSError):
                a = addr.read_text().strip()
                if a.startswith("unix://"):
                    socks.append(Path(a[len("unix://") :]))
        return socks

    def _kill_leftovers(self) -> None:
        self._shim_socket_list = self._shim_sockets()
        for _ in range(3):
            victims = {pid for pid, _ in _procs_mentioning(str(self.socket))}
            for d in self.pod_cgroup_dirs():
                with contextlib.suppress(OSError):
                    victims |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
            victims.discard(os.getpid())
            if not victims:
                return
            log.warning("killing leftover processes %s", sorted(victims))
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def _unmount_leftovers(self) -> None:
        for _ in range(5):
            mounts = mounts_under(self.workdir)
            if not mounts:
                return
            for m in sorted(mounts, key=lambda p: -len(Path(p).parts)):
                r = subprocess.run(["umount", m], capture_output=True, check=False)
                if r.returncode != 0:
                    log.warning("umount %s failed (%s); detaching", m, r.stderr.decode().strip())
                    subprocess.run(["umount", "-l", m], capture_output=True, check=False)

    def _remove_pod_netns(self) -> None:
        for p in self._pod_netns:
            if p.exists():
                log.warning("removing pod netns %s left by CRI", p)
                subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)
                with contextlib.suppress(OSError):
                    p.unlink()

    def _remove_cgroups(self) -> None:
        for d in self.pod_cgroup_dirs():
            try:
                d.rmdir()
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", d, exc)

    def _remove_shim_sockets(self) -> None:
        for s in getattr(self, "_shim_socket_list", []):
            with contextlib.suppress(OSError):
                s.unlink()

    def _delete_netns(self) -> None:
        if self._netns_created and self.netns in _list_netns():
            _run(["ip", "netns", "delete", self.netns])
        # CNI result cache lives at libcni's fixed default; our entries carry our network name
        for f in Path("/var/lib/cni/results").glob(f"{self.name}-*"):
            with contextlib.suppress(OSError):
                f.unlink()

    def _remove_files(self) -> None:
        if self.keep_workdir or not self.workdir.exists():
            return
        if mounts_under(self.workdir):
            raise RuntimeError(f"not removing {self.workdir}: mounts remain {mounts_under(self.workdir)}")
        shutil.rmtree(self.workdir)

    def _dump_log_tail(self) -> None:
        log.error("containerd log tail:\n%s", self.log_tail())


@contextlib.contextmanager
def cri_containerd(workdir: Path, **kwargs: Any) -> Iterator[CriContainerd]:
    """Context manager form of :class:`CriContainerd` (start on enter, full teardown on exit)."""
    h = CriContainerd(workdir, **kwargs)
    h.start()
    try:
        yield h
    finally:
        h.stop()


# host helpers -----------------------------------------------------------------------------------
def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
        )
    return r


def _list_netns() -> set[str]:
    return {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.exists() else set()


def _procs_mentioning(needle: str) -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append((int(d.name), cmd.strip()))
    return out


def _cgroup_hierarchies() -> list[Path]:
    """Mounted cgroup hierarchies (v1 controllers, named, and the v2 unified mount)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split()[0] if right else ""
            if fstype in ("cgroup", "cgroup2"):
                out.append(Path(unescape_mountinfo(left.split()[4])))
    return out


__all__ = [
    "BUSYBOX_IMAGE",
    "PAUSE_IMAGE",
    "PYVM_RUNTIME_TYPE",
    "CriClient",
    "CriContainerd",
    "ExecResult",
    "cri_containerd",
    "linux_resources",
    "load_mkimage",
    "missing_prerequisites",
]
