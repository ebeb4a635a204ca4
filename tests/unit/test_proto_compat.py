"""Our proto/containerd files are wire-compatible with containerd's own.

containerd's .proto files come from Debian's Go source packages (installed by hack/setup.sh, never
copied into this repo). They are compiled here with grpc_tools' protoc and compared, descriptor by
descriptor, with the modules we generate into shim/_pb: full names, field numbers, names, types,
labels, message/enum type names, enum values and RPC signatures. A round trip through both sets of
classes then checks the bytes agree.

A missing Debian package fails the test with the package's name: CI installs them, so a skip would
only hide a broken set-up.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from shim._pb.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1
from shim._pb.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2
from shim._pb.containerd.events import task_pb2 as events
from shim._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from shim._pb.containerd.runtimeoptions.v1 import options_pb2
from shim._pb.containerd.services.events.ttrpc.v1 import events_pb2 as ttrpc_events
from shim._pb.containerd.task.v2 import shim_pb2 as task_v2
from shim._pb.containerd.task.v3 import shim_pb2 as task_v3
from shim._pb.containerd.types import introspection_pb2, mount_pb2
from shim._pb.containerd.types.task import task_pb2 as types_task

ROOT = Path(__file__).resolve().parents[2]
GOCODE = Path("/usr/share/gocode/src")
CONTAINERD = "github.com/containerd/containerd"
CONTAINERD_PKG = "golang-github-containerd-containerd-dev"
CGROUPS_PKG = "golang-github-containerd-cgroups-dev"
GOGO_PKG = "golang-github-gogo-protobuf-dev"
# containerd's files import gogo's options as "gogoproto/gogo.proto" (or by full Go path).
GOGO_INCLUDE = GOCODE / "github.com/gogo/protobuf"


@dataclass(frozen=True)
class Pair:
    """One of our generated modules and the upstream file it must match."""

    ours: ModuleType
    # Candidate paths under GOCODE, first existing wins (upstream moved some files between versions).
    upstream: tuple[str, ...]
    apt_package: str

    @property
    def id(self) -> str:
        return self.ours.DESCRIPTOR.name


PAIRS = [
    Pair(task_v2, (f"{CONTAINERD}/runtime/v2/task/shim.proto",), CONTAINERD_PKG),
    Pair(mount_pb2, (f"{CONTAINERD}/api/types/mount.proto",), CONTAINERD_PKG),
    Pair(types_task, (f"{CONTAINERD}/api/types/task/task.proto",), CONTAINERD_PKG),
    Pair(events, (f"{CONTAINERD}/api/events/task.proto",), CONTAINERD_PKG),
    Pair(ttrpc_events, (f"{CONTAINERD}/api/services/ttrpc/events/v1/events.proto",), CONTAINERD_PKG),
    Pair(options_pb2, (f"{CONTAINERD}/pkg/runtimeoptions/v1/api.proto",), CONTAINERD_PKG),
    Pair(cgroups_v1, ("github.com/containerd/cgroups/stats/v1/metrics.proto",), CGROUPS_PKG),
    Pair(
        cgroups_v2,
        (
            "github.com/containerd/cgroups/v2/stats/metrics.proto",  # cgroups 1.x (Debian 12)
            "github.com/containerd/cgroups/cgroup2/stats/metrics.proto",  # cgroups 3.x
        ),
        CGROUPS_PKG,
    ),
]

# What ours may have beyond the upstream file: containerd/cgroups 3.x grew the cgroup v2 schema
# (PSI, CPU burst, peak memory, per-interface network) after the 1.0.4 that Debian 12 ships. Both
# are valid encodings of the same message; older readers skip the new fields.
ALLOWED_EXTRAS = frozenset(
    {
        ".io.containerd.cgroups.v2.Metrics.network",
        ".io.containerd.cgroups.v2.PSIData",
        ".io.containerd.cgroups.v2.PSIStats",
        ".io.containerd.cgroups.v2.NetworkStat",
        ".io.containerd.cgroups.v2.CPUStat.psi",
        ".io.containerd.cgroups.v2.CPUStat.nr_bursts",
        ".io.containerd.cgroups.v2.CPUStat.burst_usec",
        ".io.containerd.cgroups.v2.MemoryStat.max_usage",
        ".io.containerd.cgroups.v2.MemoryStat.swap_max_usage",
        ".io.containerd.cgroups.v2.MemoryStat.psi",
        ".io.containerd.cgroups.v2.IOStat.psi",
    }
)


# ---------------------------------------------------------------------------------------------
# Compiling upstream


def _require(path: Path, apt_package: str) -> None:
    if not path.exists():
        pytest.fail(
            f"{path} is missing: install the Debian package {apt_package} (hack/setup.sh does)",
            pytrace=False,
        )


def _upstream_path(pair: Pair) -> str:
    for rel in pair.upstream:
        if (GOCODE / rel).exists():
            return rel
    _require(GOCODE / pair.upstream[0], pair.apt_package)
    raise AssertionError("unreachable")


@cache
def _compile(rel: str) -> descriptor_pb2.FileDescriptorSet:
    """Compile GOCODE/rel and its imports with grpc_tools' protoc into a FileDescriptorSet."""
    import grpc_tools

    _require(GOGO_INCLUDE / "gogoproto/gogo.proto", GOGO_PKG)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        # One file per protoc run: containerd imports gogo.proto under two different names, which
        # would clash inside a single run.
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{well_known}",
                f"-I{GOCODE}",
                f"-I{GOGO_INCLUDE}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                rel,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"protoc failed on upstream {rel}:\n{proc.stderr}"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _upstream_file(pair: Pair) -> descriptor_pb2.FileDescriptorProto:
    rel = _upstream_path(pair)
    (fdp,) = [f for f in _compile(rel).file if f.name == rel]
    return fdp


@cache
def _upstream_pool(rel: str) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for fdp in _compile(rel).file:  # protoc writes dependencies first
        pool.Add(fdp)
    return pool


def _ours_file(module: ModuleType) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


# ---------------------------------------------------------------------------------------------
# Flattening a file into comparable facts


@dataclass(frozen=True)
class FieldFacts:
    name: str
    type: int
    label: int
    type_name: str  # fully qualified, "" for scalars
    proto3_optional: bool


def _messages(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, msgs: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in msgs:
            found[f"{prefix}.{m.name}"] = m
            walk(f"{prefix}.{m.name}", list(m.nested_type))

    walk(f".{fdp.package}", list(fdp.message_type))
    return found


def _enums(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    found = {f".{fdp.package}.{e.name}": {v.name: v.number for v in e.value} for e in fdp.enum_type}
    for name, m in _messages(fdp).items():
        found.update({f"{name}.{e.name}": {v.name: v.number for v in e.value} for e in m.enum_type})
    return found


def _fields(msg: descriptor_pb2.DescriptorProto) -> dict[int, FieldFacts]:
    return {f.number: FieldFacts(f.name, f.type, f.label, f.type_name, f.proto3_optional) for f in msg.field}


def _services(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, tuple[str, str, bool, bool]]]:
    return {
        f".{fdp.package}.{s.name}": {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in s.method
        }
        for s in fdp.service
    }


def _mismatches(
    ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto
) -> list[str]:
    """Every way `ours` differs from `theirs` on the wire or in names, except ALLOWED_EXTRAS."""
    problems: list[str] = []
    if ours.package != theirs.package:
        problems.append(f"package {ours.package!r} != upstream {theirs.package!r}")

    our_msgs, their_msgs = _messages(ours), _messages(theirs)
    for name in sorted(their_msgs.keys() - our_msgs.keys()):
        problems.append(f"message {name} missing")
    for name in sorted(our_msgs.keys() - their_msgs.keys() - ALLOWED_EXTRAS):
        problems.append(f"message {name} has no upstream counterpart")
    for name in sorted(our_msgs.keys() & their_msgs.keys()):
        ours_m, theirs_m = our_msgs[name], their_msgs[name]
        if ours_m.options.map_entry != theirs_m.options.map_entry:
            problems.append(f"{name}: map_entry {ours_m.options.map_entry} != {theirs_m.options.map_entry}")
        our_fields, their_fields = _fields(ours_m), _fields(theirs_m)
        for num, want in sorted(their_fields.items()):
            got = our_fields.get(num)
            if got is None:
                problems.append(f"{name}.{want.name} (= {num}) missing")
            elif got != want:
                problems.append(f"{name} field {num}: ours {got} != upstream {want}")
        for num in sorted(our_fields.keys() - their_fields.keys()):
            if f"{name}.{our_fields[num].name}" not in ALLOWED_EXTRAS:
                problems.append(f"{name}.{our_fields[num].name} (= {num}) has no upstream counterpart")

    our_enums, their_enums = _enums(ours), _enums(theirs)
    if our_enums != their_enums:
        problems.append(f"enums differ: ours {our_enums} != upstream {their_enums}")
    our_svcs, their_svcs = _services(ours), _services(theirs)
    if our_svcs != their_svcs:
        problems.append(f"services differ: ours {our_svcs} != upstream {their_svcs}")
    return problems


# ---------------------------------------------------------------------------------------------
# Descriptor comparison


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.id)
def test_descriptors_match_upstream(pair: Pair) -> None:
    problems = _mismatches(_ours_file(pair.ours), _upstream_file(pair))
    assert not problems, f"{pair.id} vs {_upstream_path(pair)}:\n  " + "\n  ".join(problems)


def test_comparison_catches_a_renumbered_field() -> None:
    """The checker itself: a field moved to another number must be reported."""
    pair = PAIRS[0]
    ours = _ours_file(pair.ours)
    (wait_resp,) = [m for m in ours.message_type if m.name == "WaitResponse"]
    wait_resp.field[0].number = 7
    problems = _mismatches(ours, _upstream_file(pair))
    assert any("WaitResponse" in p for p in problems), problems


def test_task_service_lists_every_rpc() -> None:
    methods = [m.name for m in task_v2.DESCRIPTOR.services_by_name["Task"].methods]
    assert methods == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
        "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
    ]  # fmt: skip


def test_task_v3_is_v2_under_another_package() -> None:
    v2, v3 = _ours_file(task_v2), _ours_file(task_v3)
    assert (v2.package, v3.package) == ("containerd.task.v2", "containerd.task.v3")
    for msg in _messages(v3).values():
        for f in msg.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(".containerd.task.v3.", ".containerd.task.v2.")
    for svc in v3.service:
        for m in svc.method:
            m.input_type = m.input_type.replace(".containerd.task.v3.", ".containerd.task.v2.")
            m.output_type = m.output_type.replace(".containerd.task.v3.", ".containerd.task.v2.")
    assert list(v3.dependency) == list(v2.dependency)
    assert list(v3.message_type) == list(v2.message_type)
    assert list(v3.enum_type) == list(v2.enum_type)
    assert list(v3.service) == list(v2.service)


# ---------------------------------------------------------------------------------------------
# Bytes: ours -> upstream -> ours


def _fill(msg: Message, guide: Descriptor, depth: int = 0) -> None:
    """Set every field of `msg` that `guide` (the upstream message) also has, to a distinct value."""
    by_number = {f.number: f for f in msg.DESCRIPTOR.fields}
    for g in guide.fields:
        f = by_number[g.number]
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(msg, f.name).update({f"{f.name}-k1": f"{f.name}-v1", f"{f.name}-k2": "v2"})
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 4:
                continue
            items = [getattr(msg, f.name).add() for _ in range(2)] if _repeated(f) else [getattr(msg, f.name)]
            for item in items:
                _fill(item, g.message_type, depth + 1)
            continue
        value = _scalar(f)
        if _repeated(f):
            getattr(msg, f.name).extend([value, value])
        else:
            setattr(msg, f.name, value)


def _repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated


def _scalar(f: FieldDescriptor) -> object:
    if f.type == FieldDescriptor.TYPE_STRING:
        return f"{f.name}-value"
    if f.type == FieldDescriptor.TYPE_BYTES:
        return f.name.encode()
    if f.type == FieldDescriptor.TYPE_BOOL:
        return True
    if f.type == FieldDescriptor.TYPE_ENUM:
        return f.enum_type.values[-1].number
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return f.number + 0.5
    return f.number * 1000 + 7  # every integer type; below 10**9 so also valid as Timestamp.nanos


def _dump(msg: Message) -> dict[int, object]:
    """Field number -> value, recursively: comparable across the two sets of classes."""

    def conv(f: FieldDescriptor, v: object) -> object:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value_field = f.message_type.fields_by_name["value"]
            return {k: conv(value_field, x) for k, x in v.items()}  # type: ignore[attr-defined]
        if _repeated(f):
            return [conv_one(f, x) for x in v]  # type: ignore[attr-defined]
        return conv_one(f, v)

    def conv_one(f: FieldDescriptor, v: object) -> object:
        return _dump(v) if isinstance(v, Message) else v

    return {f.number: conv(f, v) for f, v in msg.ListFields()}


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.id)
def test_bytes_round_trip_through_upstream_classes(pair: Pair) -> None:
    rel = _upstream_path(pair)
    pool = _upstream_pool(rel)
    for desc in pair.ours.DESCRIPTOR.message_types_by_name.values():
        if f".{desc.full_name}" in ALLOWED_EXTRAS:
            continue
        theirs_desc = pool.FindMessageTypeByName(desc.full_name)
        ours = message_factory.GetMessageClass(desc)()
        _fill(ours, theirs_desc)
        theirs = message_factory.GetMessageClass(theirs_desc).FromString(ours.SerializeToString())
        assert _dump(theirs) == _dump(ours), desc.full_name
        back = type(ours).FromString(theirs.SerializeToString())
        assert back == ours, desc.full_name


# ---------------------------------------------------------------------------------------------
# Files without a counterpart in containerd 1.6: pin the numbers from containerd 2.x


def test_bootstrap_numbers_are_those_of_containerd_2_3() -> None:
    def numbers(cls: type[Message]) -> dict[str, int]:
        return {f.name: f.number for f in cls.DESCRIPTOR.fields}

    assert numbers(bootstrap_pb2.BootstrapParams) == {
        "instance_id": 1, "namespace": 2, "log_level": 3, "containerd_version": 4,
        "containerd_ttrpc_address": 5, "containerd_grpc_address": 6, "containerd_binary": 7,
        "extensions": 8, "socket_dir": 9,
    }  # fmt: skip
    assert bootstrap_pb2.BootstrapParams.DESCRIPTOR.fields_by_name["socket_dir"].has_presence
    assert numbers(bootstrap_pb2.BootstrapResult) == {
        "version": 1, "address": 2, "protocol": 3, "capabilities": 4, "metadata": 5,
    }  # fmt: skip
    assert numbers(bootstrap_pb2.Extension) == {"value": 1}
    assert dict(bootstrap_pb2.LogLevel.items()) == {
        "LOG_LEVEL_INFO": 0, "LOG_LEVEL_TRACE": -8, "LOG_LEVEL_DEBUG": -4, "LOG_LEVEL_WARN": 4,
        "LOG_LEVEL_ERROR": 8, "LOG_LEVEL_FATAL": 10, "LOG_LEVEL_PANIC": 12,
    }  # fmt: skip
    assert numbers(introspection_pb2.RuntimeInfo) == {
        "name": 1, "version": 2, "options": 3, "features": 4, "annotations": 5,
    }  # fmt: skip
    assert numbers(introspection_pb2.RuntimeVersion) == {"version": 1, "revision": 2}
    assert numbers(introspection_pb2.RuntimeRequest) == {"runtime_path": 1, "options": 2}


# ---------------------------------------------------------------------------------------------
# Staleness


def test_generated_code_is_not_stale() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "hack/gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
