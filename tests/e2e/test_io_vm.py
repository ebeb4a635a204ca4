"""Container IO paths end to end against real VMs under a private containerd 1.6.

- ``file://`` log URI: stdout and stderr land in one file, complete when ``ctr run`` returns;
- ``binary://`` logger protocol: fds 3/4/5, the two env vars, ``k v`` args, byte-exact output, the
  logger gone after the container is removed;
- a logger that dies at once: the container is not blocked by output nobody can read;
- one VM for a terminal exec (``ctr task exec -t``: ``stty size`` sees the client's pty), execs with
  ``file://`` and ``binary://`` log URIs, and ~2 MiB of numbered stdout lines interleaved with
  stderr lines (complete, in order, exit code);
- a created-but-never-started task: ``ctr`` 1.6 has no ``task create`` (``ctr task start`` and
  ``ctr run`` create *and* start), so the test calls containerd's own gRPC Tasks API (Create, Wait,
  Kill, Delete) the way the Go client does: Kill(SIGKILL) stops it with 137 and releases Wait.

Each test boots one VM (QEMU TCG); afterwards nothing may be left: no QEMU, virtiofsd, shim or
logger process, no mount under the run root or the test dir, no sandbox directory.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir
from tests.helpers.pyvm_vm import (
    RUNTIME,
    VENV_BIN,
    WAIT_TTY_SIZE,
    mounts_under,
    qemu_pids,
    run_in_pty,
    virtiofsd_pids,
    vm_skip_reason,
    wait_for,
    wait_task_running,
)

pytestmark = [pytest.mark.containerd, pytest.mark.vm, pytest.mark.slow]

#: one VM boot + the container under TCG; generous: other engineers' VMs share the 2 cores
RUN_TIMEOUT = 300
NS = "default"


class Env:
    def __init__(self, c: Containerd, run_root: Path, tmp: Path) -> None:
        self.c = c
        self.run_root = run_root
        self.tmp = tmp  # short, shared by the module; each test uses its own subdirectory

    def ctr_argv(self, *args: str) -> list[str]:
        return [self.c.ctr_binary, "--address", self.c.address, *args]

    def leftovers(self, extra_pids: tuple[int, ...] = ()) -> list[str]:
        found = [f"qemu {p}" for p in qemu_pids(self.run_root)]
        found += [f"virtiofsd {p}" for p in virtiofsd_pids(self.run_root)]
        found += [f"shim {p}" for p in self.c.shim_pids()]
        found += [f"process {p}" for p in extra_pids if _alive(p)]
        found += [f"mount {m}" for m in mounts_under(self.run_root) + mounts_under(self.tmp)]
        sbs = self.run_root / "sbs"
        if sbs.exists():
            found += [f"dir {d}" for d in sbs.iterdir()]
        return found

    def assert_clean(self, extra_pids: tuple[int, ...] = (), within: float = 90.0) -> None:
        """The shim exits after Shutdown and tears the VM down asynchronously: poll for it."""
        deadline = time.monotonic() + within
        while (left := self.leftovers(extra_pids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left behind: {left}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    reason = vm_skip_reason() or Containerd.available()
    if reason:
        pytest.skip(reason)
    tmp = short_base_dir("pyvm-io-")
    run_root = short_base_dir("pyvm-run-")
    c = Containerd(extra_path=[VENV_BIN], env={"PYVM_RUN_ROOT": str(run_root)})
    try:
        with c:
            c.import_image(build_busybox_image(tmp / "bb.tar"))
            yield Env(c, run_root, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)


@pytest.fixture
def vm_env(env: Env) -> Iterator[Env]:
    yield env
    try:
        env.assert_clean()
    except AssertionError:
        env.c.remove_all()  # what a failed test left must not fail the module's next tests too
        raise


def _subdir(env: Env, name: str) -> Path:
    d = env.tmp / name
    d.mkdir(mode=0o755)
    return d


# -- file:// ----------------------------------------------------------------------------------------


def test_file_log_uri(vm_env: Env) -> None:
    """stdout and stderr appended to one file; everything is there when ``ctr run`` returns."""
    log = _subdir(vm_env, "file") / "sub" / "out.log"  # the shim creates missing directories
    r = vm_env.c.ctr(
        "run", "--rm", "--log-uri", f"file://{log}", "--runtime", RUNTIME, BUSYBOX_REF, "flog",
        "sh", "-c", "echo out; echo err >&2; exit 3",
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 3, (r.stdout, r.stderr, vm_env.c.log_tail())
    text = log.read_text()  # read at once: output must be written before the exit is reported
    assert sorted(text.splitlines()) == ["err", "out"], text
    assert text.endswith("\n") and len(text) == len("out\nerr\n"), text
    assert r.stdout == "", r.stdout  # nothing went to ctr's own stdout


# -- binary:// --------------------------------------------------------------------------------------

LOGGER = """#!/usr/bin/python3
import json, os, sys, threading
OUT = {out!r}
fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
with open(OUT + "/info.json", "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid(), "fds": fds}}, f)

def pump(fd, name):
    with open(OUT + "/" + name, "wb") as f:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            f.write(b)
            f.flush()

ts = [threading.Thread(target=pump, args=(3, "stdout")), threading.Thread(target=pump, args=(4, "stderr"))]
for t in ts:
    t.start()
os.write(5, b"r")
os.close(5)
for t in ts:
    t.join()
open(OUT + "/done", "w").close()
"""


def test_binary_logger(vm_env: Env) -> None:
    d = _subdir(vm_env, "binlog")
    logger = d / "logger.py"
    logger.write_text(LOGGER.format(out=str(d)))
    logger.chmod(0o755)
    script = "echo out1; echo err1 >&2; printf 'out2 no newline'; printf 'err2\\n' >&2; exit 4"
    r = vm_env.c.ctr(
        "run", "--rm", "--log-uri", f"binary://{logger}?k=v", "--runtime", RUNTIME, BUSYBOX_REF, "blog",
        "sh", "-c", script,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 4, (r.stdout, r.stderr, vm_env.c.log_tail())
    info = json.loads((d / "info.json").read_text())
    assert info["argv"] == ["k", "v"], info
    env = info["env"]
    assert env.get("CONTAINER_ID") == "blog" and env.get("CONTAINER_NAMESPACE") == NS, env
    assert set(env) <= {"CONTAINER_ID", "CONTAINER_NAMESPACE", "LC_CTYPE"}, env  # LC_CTYPE: PEP 538
    assert {0, 1, 2, 3, 4, 5} <= set(info["fds"]) and len(info["fds"]) <= 7, info["fds"]  # + listdir's
    wait_for(lambda: (d / "done").exists(), 15, "the logger to see EOF on fds 3 and 4")
    assert (d / "stdout").read_bytes() == b"out1\nout2 no newline"
    assert (d / "stderr").read_bytes() == b"err1\nerr2\n"
    wait_for(lambda: not _alive(info["pid"]), 20, f"logger pid {info['pid']} to exit")
    vm_env.assert_clean(extra_pids=(info["pid"],))


# -- one VM: exec with a terminal, then volume and ordering ------------------------------------------

LINES = 200_000  # "out N\n" ~ 2.2 MB on stdout
ERR_EVERY = 997
PRODUCER = (
    "while [ ! -e /tmp/go ]; do sleep 0.2; done; "
    f'awk \'BEGIN {{ for (i = 1; i <= {LINES}; i++) {{ print "out " i; '
    f'if (i % {ERR_EVERY} == 0) {{ print "err " i > "/dev/stderr"; fflush("/dev/stderr"); fflush() }} }} }}\'; '
    "exit 5"
)


def _expected() -> tuple[bytes, bytes]:
    out = b"".join(b"out %d\n" % i for i in range(1, LINES + 1))
    err = b"".join(b"err %d\n" % i for i in range(ERR_EVERY, LINES + 1, ERR_EVERY))
    return out, err


def test_exec_tty_and_output_volume(vm_env: Env) -> None:
    d = _subdir(vm_env, "vol")
    out_f, err_f = open(d / "out", "wb"), open(d / "err", "wb")
    argv = vm_env.ctr_argv("run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, "vol", "sh", "-c", PRODUCER)
    with out_f, err_f:
        run = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f)
    try:
        wait_task_running(vm_env.c, "vol", run, RUN_TIMEOUT)

        # exec with a terminal: the pty of the ctr client is 21x77
        argv = vm_env.ctr_argv(
            "task", "exec", "-t", "--exec-id", "t1", "vol", "sh", "-c", WAIT_TTY_SIZE + "; tty"
        )
        text, code = run_in_pty(argv, 21, 77, RUN_TIMEOUT)
        assert code == 0, text
        assert "size=21 77 " in text, text
        assert "/dev/pts/" in text, text

        # exec processes with log URIs: a file, and a logger that is told the container's id
        elog = d / "exec.log"
        e = vm_env.c.ctr(
            "task", "exec", "--log-uri", f"file://{elog}", "--exec-id", "f1", "vol",
            "sh", "-c", "echo eo; echo ee >&2; exit 2",
        )  # fmt: skip
        assert e.returncode == 2, e.stderr
        assert sorted(elog.read_text().splitlines()) == ["ee", "eo"], elog.read_text()
        bl = _subdir(vm_env, "execlog")
        (bl / "logger.py").write_text(LOGGER.format(out=str(bl)))
        (bl / "logger.py").chmod(0o755)
        e = vm_env.c.ctr(
            "task", "exec", "--log-uri", f"binary://{bl / 'logger.py'}?a=b", "--exec-id", "b1", "vol",
            "sh", "-c", "echo bo; echo be >&2",
        )  # fmt: skip
        assert e.returncode == 0, e.stderr
        info = json.loads((bl / "info.json").read_text())
        assert info["argv"] == ["a", "b"] and info["env"]["CONTAINER_ID"] == "vol", info
        wait_for(lambda: (bl / "done").exists(), 15, "the exec's logger to see EOF")
        assert (bl / "stdout").read_bytes() == b"bo\n"
        assert (bl / "stderr").read_bytes() == b"be\n"
        wait_for(lambda: not _alive(info["pid"]), 20, f"exec logger pid {info['pid']} to exit")

        e = vm_env.c.ctr("task", "exec", "--exec-id", "go", "vol", "touch", "/tmp/go")
        assert e.returncode == 0, e.stderr
        run.wait(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:  # a step failed: end the container; ctr run --rm then deletes it
            vm_env.c.ctr("task", "kill", "-s", "SIGKILL", "vol")
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
    out, err = (d / "out").read_bytes(), (d / "err").read_bytes()
    want_out, want_err = _expected()
    assert run.returncode == 5, (err[-2000:], vm_env.c.log_tail())
    assert len(out) == len(want_out), (len(out), len(want_out), out[-200:])
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(want_out).hexdigest()
    assert err == want_err, err[-500:]


# -- a created-but-never-started task, through containerd's gRPC Tasks API ------------------------------


def _tasks_api() -> dict[str, Any]:
    """The few messages of ``containerd.services.{tasks,snapshots}.v1`` this test needs, built at run
    time (field numbers from containerd 1.6 ``api/services/tasks/v1/tasks.proto``,
    ``api/services/snapshots/v1/snapshots.proto``, ``api/types/mount.proto``)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    S, B, U, M, REP = F.TYPE_STRING, F.TYPE_BOOL, F.TYPE_UINT32, F.TYPE_MESSAGE, F.LABEL_REPEATED
    fdp = descriptor_pb2.FileDescriptorProto(name="pyvm_e2e_tasks.proto", package="pyvm.e2e", syntax="proto3")
    shapes: dict[str, list[tuple[int, str, int, str]]] = {
        "Mount": [(1, "type", S, ""), (2, "source", S, ""), (3, "target", S, ""), (4, "options", S, "rep")],
        "MountsRequest": [(1, "snapshotter", S, ""), (2, "key", S, "")],
        "MountsResponse": [(1, "mounts", M, "rep Mount")],
        "CreateTaskRequest": [
            (1, "container_id", S, ""), (3, "rootfs", M, "rep Mount"), (4, "stdin", S, ""),
            (5, "stdout", S, ""), (6, "stderr", S, ""), (7, "terminal", B, ""),
        ],
        "CreateTaskResponse": [(1, "container_id", S, ""), (2, "pid", U, "")],
        "KillRequest": [(1, "container_id", S, ""), (2, "exec_id", S, ""), (3, "signal", U, ""), (4, "all", B, "")],
        "WaitRequest": [(1, "container_id", S, ""), (2, "exec_id", S, "")],
        "WaitResponse": [(1, "exit_status", U, "")],
        "DeleteTaskRequest": [(1, "container_id", S, "")],
        "DeleteResponse": [(1, "id", S, ""), (2, "pid", U, ""), (3, "exit_status", U, "")],
        "Empty": [],
    }  # fmt: skip
    for name, fields in shapes.items():
        m = fdp.message_type.add(name=name)
        for num, fname, ftype, extra in fields:
            f = m.field.add(
                name=fname, number=num, type=ftype, label=REP if "rep" in extra else F.LABEL_OPTIONAL
            )
            if ftype == M:
                f.type_name = ".pyvm.e2e." + extra.split()[-1]
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(fdp)
    return {n: message_factory.GetMessageClass(fd.message_types_by_name[n]) for n in shapes}


class _Grpc:
    def __init__(self, address: str) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.t = _tasks_api()
        self.md = [("containerd-namespace", NS)]

    def call(self, method: str, req: Any, resp: str, timeout: float = RUN_TIMEOUT) -> Any:
        fn = self.channel.unary_unary(
            method,
            request_serializer=type(req).SerializeToString,
            response_deserializer=self.t[resp].FromString,
        )
        return fn(req, metadata=self.md, timeout=timeout)

    def future(self, method: str, req: Any, resp: str, timeout: float = RUN_TIMEOUT) -> Any:
        fn = self.channel.unary_unary(
            method,
            request_serializer=type(req).SerializeToString,
            response_deserializer=self.t[resp].FromString,
        )
        return fn.future(req, metadata=self.md, timeout=timeout)


TASKS = "/containerd.services.tasks.v1.Tasks/"


def _task_status(env: Env, cid: str) -> str:
    for line in env.c.ctr("task", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts[:1] == [cid]:
            return parts[-1]
    return ""


def test_kill_created_never_started_task(vm_env: Env) -> None:
    c, cid = vm_env.c, "created"
    r = c.ctr("container", "create", "--runtime", RUNTIME, BUSYBOX_REF, cid, "sleep", "100")
    assert r.returncode == 0, r.stderr
    g = _Grpc(c.address)
    t = g.t
    try:
        info = json.loads(c.ctr("container", "info", cid, check=True).stdout)
        mounts = g.call(
            "/containerd.services.snapshots.v1.Snapshots/Mounts",
            t["MountsRequest"](snapshotter=info["Snapshotter"], key=info["SnapshotKey"]),
            "MountsResponse",
        ).mounts
        assert mounts, "the container's snapshot has no mounts"
        created = g.call(
            TASKS + "Create", t["CreateTaskRequest"](container_id=cid, rootfs=mounts), "CreateTaskResponse"
        )
        assert created.pid > 0, created
        assert _task_status(vm_env, cid) == "CREATED"

        waiting = g.future(TASKS + "Wait", t["WaitRequest"](container_id=cid), "WaitResponse")
        time.sleep(1.0)
        assert not waiting.done(), "Wait returned before the task was killed"
        g.call(
            TASKS + "Kill",
            t["KillRequest"](container_id=cid, signal=int(signal.SIGKILL)),
            "Empty",
            timeout=60,
        )
        try:
            waited = waiting.result(timeout=60)
        except concurrent.futures.TimeoutError:
            pytest.fail("Wait was not released by Kill(SIGKILL) of the created task")
        assert waited.exit_status == 137, waited
        assert _task_status(vm_env, cid) == "STOPPED"

        deleted = g.call(
            TASKS + "Delete", t["DeleteTaskRequest"](container_id=cid), "DeleteResponse", timeout=120
        )
        assert deleted.exit_status == 137, deleted
        assert _task_status(vm_env, cid) == ""
    finally:
        g.channel.close()
        if _task_status(vm_env, cid):
            c.ctr("task", "kill", "-s", "SIGKILL", cid)
            c.ctr("task", "delete", "--force", cid)
        c.ctr("container", "delete", cid)


def test_binary_logger_that_dies_does_not_block_the_container(vm_env: Env) -> None:
    """A logger that exits right away (its fds 3/4 closed): the container's output cannot be
    delivered, but the container still runs to its end and its exit code is reported (runc's
    process would get EPIPE; it must never hang on a stream nobody reads)."""
    d = _subdir(vm_env, "deadlog")
    logger = d / "logger.sh"
    logger.write_text("#!/bin/sh\necho $$ > " + str(d / "pid") + "\nexit 0\n")
    logger.chmod(0o755)
    script = "head -c 8388608 /dev/zero; echo end >&2; exit 6"  # 8 MiB: more than any buffer
    r = vm_env.c.ctr(
        "run", "--rm", "--log-uri", f"binary://{logger}", "--runtime", RUNTIME, BUSYBOX_REF, "deadlog",
        "sh", "-c", script,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 6, (r.stdout, r.stderr, vm_env.c.log_tail())
    vm_env.assert_clean(extra_pids=(int((d / "pid").read_text()),))
