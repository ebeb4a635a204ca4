from __future__ import annotations

import dataclasses
from pathlib import Path

from shim.guestimage import builder, rootfs
from shim.guestimage.apt import Package
from shim.guestimage.arch import ARCHES


def _inputs(**changes: object) -> builder.Inputs:
    base = builder.Inputs(
        arch="x86_64",
        layout="disk",
        kernel="linux-image-6.1.0-56-cloud-amd64=6.1.192-2",
        busybox="busybox-static=1:1.35.0-4+deb12u1+b1",
        base_key="5cf1a8688112f221",
        wheels={"protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl": "aa"},
        agent_digest="cc",
        builder_digest="dd",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_hash_is_stable() -> None:
    assert _inputs().hash() == _inputs().hash()
    assert len(_inputs().hash()) == 16


def test_every_input_changes_the_hash() -> None:
    h = _inputs().hash()
    for change in (
        {"arch": "aarch64"},
        {"layout": "initramfs"},
        {"kernel": "linux-image-6.1.0-57-cloud-amd64=6.1.200-1"},
        {"busybox": "busybox-static=1:1.36"},
        {"base_key": "0000000000000000"},
        {"wheels": {"protobuf-6.33.7-cp39-abi3-manylinux2014_x86_64.whl": "aa"}},
        {"agent_digest": "cd"},
        {"builder_digest": "de"},
        {"builder_version": builder.BUILDER_VERSION + 1},
    ):
        assert _inputs(**change).hash() != h, change


def test_agent_source_digest_follows_file_contents(tmp_path: Path) -> None:
    (tmp_path / "shim" / "guestagent").mkdir(parents=True)
    (tmp_path / "shim" / "__init__.py").write_text("")
    agent = tmp_path / "shim" / "guestagent" / "server.py"
    agent.write_text("x = 1\n")
    files = builder.agent_files(tmp_path)
    assert sorted(files) == ["shim/__init__.py", "shim/guestagent/server.py"]
    before = builder.digest_files(files)
    agent.write_text("x = 2\n")
    assert builder.digest_files(builder.agent_files(tmp_path)) != before
    (tmp_path / "shim" / "guestagent" / "__pycache__").mkdir()
    (tmp_path / "shim" / "guestagent" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"x")
    assert sorted(builder.agent_files(tmp_path)) == ["shim/__init__.py", "shim/guestagent/server.py"]


def test_base_layer_key_ignores_agent_code_but_follows_package_pins() -> None:
    arch = ARCHES["x86_64"]
    pins = [Package("python3", "3.11.2-1+b1", "amd64"), Package("crun", "1.8.1-1+deb12u1", "amd64")]
    key = rootfs.base_key(arch, pins)
    assert rootfs.base_key(arch, list(reversed(pins))) == key
    assert rootfs.base_key(arch, [pins[0], Package("crun", "1.8.1-2", "amd64")]) != key
    assert rootfs.base_key(ARCHES["aarch64"], pins) != key


def test_current_is_replaced_atomically_and_old_images_are_pruned(tmp_path: Path) -> None:
    for h in ("aaa", "bbb", "ccc"):
        (tmp_path / h).mkdir()
        (tmp_path / h / "manifest.json").write_text("{}")
    builder._point_current(tmp_path, "aaa")
    builder._point_current(tmp_path, "bbb")
    assert (tmp_path / "current").is_symlink()
    assert str((tmp_path / "current").readlink()) == "bbb"  # relative: the tree can be moved
    builder._prune(tmp_path, keep={"bbb", "aaa"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aaa", "bbb", "current"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".current")]


def test_the_guest_gets_the_compiled_protobuf_wheel_of_its_arch(tmp_path: Path) -> None:
    """The pure-python wheel cost ~0.5 s of agent imports under TCG; a cached one must not win.
    pyroute2 has only a pure-Python wheel, the same for both arches."""
    version = builder.WHEELS["protobuf"]
    pyroute2 = f"pyroute2-{builder.WHEELS['pyroute2']}-py3-none-any.whl"
    for name in (
        f"protobuf-{version}-py3-none-any.whl",
        f"protobuf-{version}-cp39-abi3-manylinux2014_x86_64.whl",
        f"protobuf-{version}-cp39-abi3-manylinux2014_aarch64.whl",
        pyroute2,
    ):
        (tmp_path / name).write_bytes(b"")
    progress = builder.Progress("test")
    for arch in ("x86_64", "aarch64"):
        found = builder.fetch_wheels(tmp_path, ARCHES[arch], progress)  # cached: no download
        assert found["protobuf"].name == f"protobuf-{version}-cp39-abi3-manylinux2014_{arch}.whl"
        assert found["pyroute2"].name == pyroute2
    # no structlog in the guest (shim.log uses the stdlib)
    assert set(builder.WHEELS) == {"protobuf", "pyroute2"}
