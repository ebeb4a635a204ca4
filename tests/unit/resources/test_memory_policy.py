import pytest

from shim.errors import InvalidArgument, ResourceExhausted
from shim.resources.memory import MiB, plan, sandbox_memory_hint

GiB = 1024 * MiB
BLOCK = 128 * MiB


def test_no_limits_keeps_default():
    p = plan(default=512 * MiB, maximum=8 * GiB, block=BLOCK, limits={"a": None, "b": 0})
    assert p.target == 512 * MiB and p.hotplug == 0


def test_limits_are_summed_and_rounded_to_blocks():
    p = plan(default=512 * MiB, maximum=8 * GiB, block=BLOCK, limits={"a": 100 * MiB, "b": 200 * MiB})
    assert p.reserved == 300 * MiB
    assert p.target == 512 * MiB + 384 * MiB


def test_unlimited_cgroup_value_counts_as_no_limit():
    p = plan(default=512 * MiB, maximum=8 * GiB, block=BLOCK, limits={"a": (1 << 63) - 1})
    assert p.target == 512 * MiB


def test_sandbox_hint_used_only_without_container_limits():
    hint = sandbox_memory_hint({"io.kubernetes.cri.sandbox-memory": str(1 * GiB)})
    assert (
        plan(default=512 * MiB, maximum=8 * GiB, block=BLOCK, limits={}, sandbox_hint=hint).target
        == 1536 * MiB
    )
    with_limit = plan(
        default=512 * MiB, maximum=8 * GiB, block=BLOCK, limits={"a": 256 * MiB}, sandbox_hint=hint
    )
    assert with_limit.target == 768 * MiB


def test_above_maximum_is_resource_exhausted_naming_both_numbers():
    with pytest.raises(ResourceExhausted) as exc:
        plan(default=512 * MiB, maximum=2 * GiB, block=BLOCK, limits={"a": 4 * GiB})
    assert "4608 MiB" in str(exc.value) and "2048 MiB" in str(exc.value)


def test_bad_annotation_names_key_and_value():
    with pytest.raises(InvalidArgument, match=r"sandbox-memory.*'lots'"):
        sandbox_memory_hint({"io.kubernetes.cri.sandbox-memory": "lots"})
