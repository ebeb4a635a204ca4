"""shim.config: sources, defaults, and every validation error naming key, value and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import config
from shim.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("fname", "arch"), [("configuration.toml", "x86_64"), ("configuration-arm64.toml", "aarch64")]
)
def test_shipped_files_equal_builtin_defaults(fname: str, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the shipped files name /var/lib/pyvm/guest; the built-in defaults follow shim.paths.GUEST_ROOT
    monkeypatch.setattr(config, "guest_dir", lambda a: Path("/var/lib/pyvm/guest") / a / "current")
    loaded = config.load(REPO / "config" / fname)
    assert loaded.source == REPO / "config" / fname
    from dataclasses import replace

    assert replace(loaded, source=None) == config.defaults(arch)


def test_source_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.toml"
    a.write_text("[hypervisor]\nvcpus = 2\n")
    b = tmp_path / "b.toml"
    b.write_text("[hypervisor]\nvcpus = 3\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert config.load(None, env={}).source is None
    assert config.load(None, env={"PYVM_CONFIG": str(b)}).hypervisor.vcpus == 3
    assert config.load(a, env={"PYVM_CONFIG": str(b)}).hypervisor.vcpus == 2
    monkeypatch.setattr(config, "DEFAULT_CONFIG", a)
    assert config.load(None, env={}).hypervisor.vcpus == 2


def test_explicit_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="ConfigPath"):
        config.load(tmp_path / "nope.toml")


def test_arch_selects_defaults() -> None:
    c = config.loads('[hypervisor]\narch = "aarch64"\n')
    assert c.hypervisor.machine_type == "virt"
    assert c.hypervisor.cpu_tcg == "max,pauth-impdef=on"
    assert c.hypervisor.firmware_code == Path("/usr/share/AAVMF/AAVMF_CODE.fd")


def test_timeouts_scale() -> None:
    t = config.defaults("x86_64").timeouts
    s = t.scaled(4.0)
    assert (s.boot, s.agent, s.qmp, s.shutdown) == (t.boot * 4, t.agent * 4, t.qmp * 4, t.shutdown * 4)
    assert t.scaled(0.5) == t  # never shorter than native


@pytest.mark.parametrize(
    ("toml", "key", "valid"),
    [
        ("[hypervisor]\naccelerator = 'hvf'", "hypervisor.accelerator", "'auto', 'kvm', 'tcg'"),
        ("[hypervisor]\narch = 'riscv64'", "hypervisor.arch", "'x86_64', 'aarch64'"),
        ("[hypervisor]\nmachine_type = 'pc'", "hypervisor.machine_type", "'q35'"),
        ("[hypervisor]\nvcpus = 0", "hypervisor.vcpus", "from 1 to 255"),
        ("[hypervisor]\nvcpus = true", "hypervisor.vcpus", "integer"),
        ("[hypervisor]\ndefault_memory = 1025", "hypervisor.default_memory", "multiple of 2 MiB"),
        ("[hypervisor]\ndefault_memory = 4096\nmax_memory = 2048", "hypervisor.max_memory", "at least"),
        ("[hypervisor]\nmax_memory = 2048", "hypervisor.max_memory", "larger than default_memory"),
        ("[hypervisor]\nmemory_slots = 0", "hypervisor.memory_slots", "at least 1"),
        (
            "[hypervisor]\nmemory_hotplug = 'balloon'",
            "hypervisor.memory_hotplug",
            "'acpi', 'virtio-mem', 'none'",
        ),
        ("[hypervisor]\npflashes = ['/a']", "hypervisor.pflashes", "two absolute paths"),
        ("[hypervisor]\npflashes = ['/a', '/a']", "hypervisor.pflashes", "two different files"),
        ("[hypervisor]\npflashes = ['a', '/b']", "hypervisor.pflashes", "absolute path"),
        ("[hypervisor]\nkernel = 'vmlinuz'", "hypervisor.kernel", "absolute path"),
        ("[hypervisor]\npath = '/usr/bin/qemu,x'", "hypervisor.path", "without commas"),
        ("[hypervisor]\ninitrd = ''\nimage = ''", "hypervisor.initrd", "set when hypervisor.image is empty"),
        ("[hypervisor]\nkernel_params = 3", "hypervisor.kernel_params", "a string"),
        ("[hypervisor]\ntcg_tb_size = -1", "hypervisor.tcg_tb_size", "an integer from 0"),
        ("[hypervisor]\ntcg_tb_size = 64.5", "hypervisor.tcg_tb_size", "an integer from 0"),
        ("[hypervisor]\ncpu_tcg = ''", "hypervisor.cpu_tcg", "non-empty"),
        ("[shared_fs]\ncache = 'never'", "shared_fs.cache", "'auto', 'always', 'none'"),
        ("[shared_fs]\nkind = '9p'", "shared_fs.kind", "'virtio-fs', 'none'"),
        ("[shared_fs]\nextra_args = 'x'", "shared_fs.extra_args", "list of non-empty strings"),
        ("[timeouts]\nboot = 0", "timeouts.boot", "> 0"),
        ("[timeouts]\nagent = 'x'", "timeouts.agent", "number of seconds"),
        ("[runtime]\nenable_annotations = [1]", "runtime.enable_annotations", "list of non-empty strings"),
    ],
)
def test_bad_values_name_key_value_and_valid(toml: str, key: str, valid: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        config.loads(toml)
    msg = str(ei.value)
    assert key in msg and valid in msg
    assert ei.value.facts["key"] == key


def test_unknown_key_and_section() -> None:
    with pytest.raises(
        InvalidArgument, match=r"unknown configuration key hypervisor\.memroy.*valid keys.*'default_memory'"
    ):
        config.loads("[hypervisor]\nmemroy = 1")
    with pytest.raises(InvalidArgument, match=r"unknown configuration section \[agent\]"):
        config.loads("[agent]\nx = 1")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        config.loads("[hypervisor")


def test_arm64_acpi_without_pflash_refused_naming_pflashes_and_acpi_ged() -> None:
    with pytest.raises(InvalidArgument) as ei:
        config.loads('[hypervisor]\narch = "aarch64"\npflashes = []\n')
    msg = str(ei.value)
    assert "pflashes" in msg and "acpi-ged" in msg and "missing acpi-ged device" in msg
    assert ei.value.facts["key"] == "hypervisor.pflashes"
    # the alternatives are accepted
    assert (
        config.loads(
            '[hypervisor]\narch="aarch64"\npflashes=[]\nmemory_hotplug="virtio-mem"'
        ).hypervisor.pflashes
        == ()
    )
    assert (
        config.loads(
            '[hypervisor]\narch="aarch64"\npflashes=[]\nmemory_hotplug="none"'
        ).hypervisor.memory_hotplug
        == "none"
    )


def test_validate_catches_code_built_configs() -> None:
    from dataclasses import replace

    c = config.defaults("aarch64")
    bad = replace(c, hypervisor=replace(c.hypervisor, pflashes=()))
    with pytest.raises(InvalidArgument, match="acpi-ged"):
        config.validate(bad)


def test_with_overrides_and_empty_image() -> None:
    c = config.with_overrides(config.defaults("x86_64"), image="", vcpus=2)
    assert c.hypervisor.image is None and c.hypervisor.vcpus == 2
    with pytest.raises(InvalidArgument, match=r"unknown configuration key hypervisor\.nope"):
        config.with_overrides(c, nope=1)
