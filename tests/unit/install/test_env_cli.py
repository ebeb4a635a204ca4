"""`pyvm env [--json]`: valid JSON with the promised keys; unknown fields carry their reason."""

from __future__ import annotations

import json

import pytest

from shim import paths
from shim.cli.pyvm import main

KEYS = {"accelerator", "qemu_version", "firmware", "guest_image_hash", "config_path", "versions"}


@pytest.fixture
def guest_root(tmp_path, monkeypatch):
    root = tmp_path / "guest"
    monkeypatch.setattr(paths, "GUEST_ROOT", root)
    monkeypatch.setenv("PYVM_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.delenv("PYVM_CONFIG", raising=False)
    return root


def env_json(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["env", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


def test_json_has_the_keys_and_says_why_things_are_unknown(guest_root, capsys, tmp_path):
    cfg = tmp_path / "configuration.toml"
    cfg.write_text('[runtime]\nenable_annotations = ["default_memory"]\n')
    rc, report = env_json(capsys, "--config", str(cfg))
    assert rc == 0
    assert KEYS <= set(report)
    assert report["config_path"] == str(cfg)
    assert report["guest_image_hash"] == "unknown"
    assert "pyvm guest build" in report["unknown_reasons"]["guest_image_hash"]
    assert report["enable_annotations"] == ["default_memory"]
    assert report["versions"]["pyvm"]
    # no cached probe in the fresh cache dir (or no QEMU at all): unknown, with the way out
    if report["accelerator"] == "unknown":
        assert report["unknown_reasons"]["accelerator"]


def test_guest_hash_comes_from_the_manifest(guest_root, capsys, tmp_path):
    from shim import config

    arch = config.host_arch()
    image = guest_root / arch / "0123abcd"
    image.mkdir(parents=True)
    (image / "manifest.json").write_text(json.dumps({"hash": "0123abcd", "kernel": {"release": "6.1.0-x"}}))
    (guest_root / arch / "current").symlink_to("0123abcd")
    rc, report = env_json(capsys)
    assert rc == 0
    assert report["guest_image_hash"] == "0123abcd"
    assert report["guest_kernel"] == "6.1.0-x"
    assert "guest_image_hash" not in report["unknown_reasons"]


def test_forced_accelerator_is_reported_without_probing(guest_root, capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hypervisor]\naccelerator = "tcg"\n')
    rc, report = env_json(capsys, "--config", str(cfg))
    assert rc == 0
    assert report["accelerator"] == "tcg"
    assert "forced" in report["accelerator_reason"]


def test_invalid_config_exits_2_naming_the_key(guest_root, capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[hypervisor]\nvcpus = 0\n")
    rc = main(["env", "--json", "--config", str(cfg)])
    captured = capsys.readouterr()
    assert rc == 2
    json.loads(captured.out)  # still a valid JSON report
    assert "hypervisor.vcpus" in captured.err
    assert str(cfg) in captured.err


def test_text_output(guest_root, capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "accelerator" in out
    assert "guest image" in out
