"""io.pyvm.* pod annotations: accepted only where [runtime] enable_annotations allows, clear errors otherwise.

(Lives here because the installation issue owns it; the function is ``shim.resources.annotations``.)
"""

from __future__ import annotations

import pytest

from shim import config
from shim.errors import InvalidArgument
from shim.resources.annotations import KNOWN, PodOverrides, parse_pod_annotations


def test_no_pyvm_annotations_means_no_overrides():
    cri = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-memory": "1"}
    got = parse_pod_annotations(cri, enabled=[])
    assert got == PodOverrides()
    assert not got
    assert got.hypervisor_overrides() == {}


def test_enabled_annotations_are_parsed():
    ann = {
        "io.pyvm.default_memory": "1024",
        "io.pyvm.max_memory": " 4096 ",
        "io.pyvm.memory_hotplug": "virtio-mem",
        "io.pyvm.vcpus": "2",
        "io.pyvm.memory_slots": "4",
    }
    got = parse_pod_annotations(ann, enabled=["default_memory", "max_memory", "memory_*", "io.pyvm.vcpus"])
    assert got == PodOverrides(
        default_memory=1024, max_memory=4096, memory_slots=4, memory_hotplug="virtio-mem", vcpus=2
    )
    assert got.hypervisor_overrides()["vcpus"] == 2


def test_star_enables_everything():
    assert parse_pod_annotations({"io.pyvm.vcpus": "3"}, enabled=["*"]).vcpus == 3


def test_disabled_annotation_names_key_value_and_what_is_enabled():
    with pytest.raises(InvalidArgument) as err:
        parse_pod_annotations({"io.pyvm.vcpus": "8"}, enabled=["default_memory"])
    msg = str(err.value)
    assert 'io.pyvm.vcpus="8"' in msg
    assert "not enabled" in msg
    assert '"default_memory"' in msg
    assert 'add "vcpus"' in msg
    assert err.value.facts["annotation"] == "io.pyvm.vcpus"


def test_nothing_enabled_by_default():
    with pytest.raises(InvalidArgument, match="allows nothing"):
        parse_pod_annotations(
            {"io.pyvm.default_memory": "512"}, enabled=config.defaults().runtime.enable_annotations
        )


def test_unknown_annotation_is_refused_with_the_known_list():
    with pytest.raises(InvalidArgument) as err:
        parse_pod_annotations({"io.pyvm.default_memroy": "512"}, enabled=["*"])
    msg = str(err.value)
    assert 'io.pyvm.default_memroy="512"' in msg
    assert "io.pyvm.default_memory" in msg


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("default_memory", "1G", "decimal integer from 64"),
        ("default_memory", "-5", "decimal integer"),
        ("default_memory", "32", "from 64"),
        ("vcpus", "0", "from 1 to 255"),
        ("vcpus", "", "decimal integer"),
        ("vcpus", "٣", "decimal integer"),  # a non-ASCII digit isdigit() accepts
        ("memory_hotplug", "dimm", '"acpi", "virtio-mem", "none"'),
    ],
)
def test_malformed_values_name_what_is_valid(key, value, valid):
    with pytest.raises(InvalidArgument) as err:
        parse_pod_annotations({f"io.pyvm.{key}": value}, enabled=["*"])
    assert f'io.pyvm.{key}="{value}" is invalid' in str(err.value)
    assert valid in str(err.value)


def test_max_below_default_is_refused():
    with pytest.raises(InvalidArgument, match="max_memory must be at least default_memory"):
        parse_pod_annotations({"io.pyvm.default_memory": "2048", "io.pyvm.max_memory": "1024"}, enabled=["*"])


def test_every_known_annotation_is_a_hypervisor_config_key():
    hv_keys = {f for f in config.HypervisorConfig.__dataclass_fields__}
    assert set(KNOWN) <= hv_keys


def test_overrides_apply_to_the_config():
    cfg = config.defaults("x86_64")
    over = parse_pod_annotations({"io.pyvm.vcpus": "2", "io.pyvm.memory_hotplug": "none"}, enabled=["*"])
    new = config.with_overrides(cfg, **over.hypervisor_overrides())
    assert new.hypervisor.vcpus == 2
    assert new.hypervisor.memory_hotplug == "none"


def test_cri_sandbox_cpu_limit_becomes_vcpus_capped_at_the_host():
    from shim.resources.annotations import cri_sandbox_vcpus

    q = {"io.kubernetes.cri.sandbox-cpu-quota": "250000", "io.kubernetes.cri.sandbox-cpu-period": "100000"}
    assert cri_sandbox_vcpus(q, host_cpus=8) == 3  # 2.5 CPUs round up
    assert cri_sandbox_vcpus(q, host_cpus=2) == 2
    assert cri_sandbox_vcpus({}, host_cpus=8) is None
    no_limit = {"io.kubernetes.cri.sandbox-cpu-quota": "0", "io.kubernetes.cri.sandbox-cpu-period": "100000"}
    assert cri_sandbox_vcpus(no_limit, host_cpus=8) is None
    assert cri_sandbox_vcpus({"io.kubernetes.cri.sandbox-cpu-quota": "x"}, host_cpus=8) is None


@pytest.mark.parametrize(
    ("cpu", "host_cpus", "expected"),
    [
        ({"quota": 200000, "period": 100000}, 8, 2),  # ctr run --cpus 2
        ({"quota": 150000, "period": 100000}, 8, 2),  # 1.5 CPUs round up
        ({"quota": 400000, "period": 100000}, 2, 2),  # capped at the host
        ({"quota": -1, "period": 100000}, 8, None),  # unlimited
        ({"shares": 1024}, 8, None),  # shares are a weight, not a limit
        ({"quota": "200000", "period": 100000}, 8, None),  # malformed
        ({"quota": True, "period": 1}, 8, None),
        (None, 8, None),
    ],
)
def test_a_standalone_containers_cpu_limit_becomes_vcpus(cpu, host_cpus, expected):
    from shim.resources.annotations import container_vcpus

    resources = {} if cpu is None else {"cpu": cpu}
    assert container_vcpus(resources, host_cpus=host_cpus) == expected
