"""Per-pod ``io.pyvm.*`` annotations through ``ctr run --annotation``: refused with the key, the value and
the fix unless known, well-formed and enabled by the node's ``[runtime] enable_annotations``.

The check runs before the VM boots, so these cost no VM; nothing may be left behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_ctr_vm import Env, _skip_reason
from tests.helpers.containerd import BUSYBOX_REF, Containerd, build_busybox_image, short_base_dir
from tests.helpers.pyvm_vm import RUNTIME, VENV_BIN

pytestmark = [pytest.mark.containerd]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    img = short_base_dir("pyvm-img-")
    run_root = short_base_dir("pyvm-run-")
    cfg = run_root / "pyvm.toml"
    cfg.write_text(
        (REPO / "config" / "configuration.toml")
        .read_text()
        .replace("enable_annotations = []", 'enable_annotations = ["vcpus"]')
    )
    c = Containerd(extra_path=[VENV_BIN], env={"PYVM_RUN_ROOT": str(run_root), "PYVM_CONFIG": str(cfg)})
    try:
        with c:
            c.import_image(build_busybox_image(img / "bb.tar"))
            yield Env(c, run_root)
    finally:
        shutil.rmtree(img, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)


def _run(env: Env, cid: str, annotation: str) -> str:
    r = env.c.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        annotation,
        BUSYBOX_REF,
        cid,
        "true",
        check=False,
        timeout=120,
    )
    assert r.returncode != 0, f"ctr run with {annotation} succeeded: {r.stdout}"
    return r.stderr + r.stdout


def test_unknown_pyvm_annotation_is_refused_naming_it(env: Env) -> None:
    msg = _run(env, "ann1", "io.pyvm.bogus=1")
    assert "io.pyvm.bogus" in msg, msg
    env.assert_clean()


def test_annotation_not_enabled_by_the_node_is_refused_naming_enable_annotations(env: Env) -> None:
    msg = _run(env, "ann2", "io.pyvm.default_memory=1024")
    assert "io.pyvm.default_memory" in msg and "enable_annotations" in msg, msg
    env.assert_clean()


def test_malformed_value_of_an_enabled_annotation_is_refused_with_what_is_valid(env: Env) -> None:
    msg = _run(env, "ann3", "io.pyvm.vcpus=lots")
    assert 'io.pyvm.vcpus="lots"' in msg and "decimal integer" in msg and "invalid argument" in msg, msg
    env.assert_clean()
