"""`pyvm install` / `pyvm uninstall` end to end on files in a temp dir (no containerd process)."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from shim.cli.pyvm import main
from shim.install import installer

ORIGINAL = b"""\
# ops: do not remove this comment
version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"   # trailing comment
"""


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Path]:
    cfg = tmp_path / "etc-containerd" / "config.toml"
    cfg.parent.mkdir()
    pyvm_cfg = tmp_path / "configuration.toml"
    pyvm_cfg.write_text("[runtime]\n")
    return {"config": cfg, "pyvm": pyvm_cfg}


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def install(node: dict[str, Path], *extra: str) -> int:
    return run("install", "--containerd-config", node["config"], "--config-path", node["pyvm"], *extra)


def uninstall(node: dict[str, Path], *extra: str) -> int:
    return run("uninstall", "--containerd-config", node["config"], *extra)


def test_install_twice_then_uninstall_restores_bytes(node, capsys):
    cfg = node["config"]
    cfg.write_bytes(ORIGINAL)
    os.chmod(cfg, 0o600)
    assert install(node) == 0
    out = capsys.readouterr().out
    assert f"saved the original as {cfg}.pyvm-backup" in out
    assert "restart containerd" in out
    installed = cfg.read_bytes()
    assert b"# ops: do not remove this comment" in installed
    assert b"# trailing comment" in installed
    pyvm = tomllib.loads(installed.decode())["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
        "runtimes"
    ]["pyvm"]
    assert pyvm["options"]["ConfigPath"] == str(node["pyvm"])
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600  # the file's mode is kept
    backup = installer.backup_path(cfg)
    assert backup.read_bytes() == ORIGINAL

    # second run: nothing changes, says so, backup untouched
    assert install(node) == 0
    assert "already registered" in capsys.readouterr().out
    assert cfg.read_bytes() == installed
    assert backup.read_bytes() == ORIGINAL

    assert uninstall(node) == 0
    assert "restored the original" in capsys.readouterr().out
    assert cfg.read_bytes() == ORIGINAL
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert not backup.exists()
    assert not installer.state_path(cfg).exists()

    # uninstalling again is a no-op
    assert uninstall(node) == 0
    assert "not registered" in capsys.readouterr().out
    assert cfg.read_bytes() == ORIGINAL


def test_backup_is_never_overwritten_by_a_second_changing_install(node, tmp_path, capsys):
    cfg = node["config"]
    cfg.write_bytes(ORIGINAL)
    assert install(node) == 0
    other = tmp_path / "other.toml"
    other.write_text("")
    assert run("install", "--containerd-config", cfg, "--config-path", other) == 0
    assert "keeping the backup" in capsys.readouterr().out
    assert installer.backup_path(cfg).read_bytes() == ORIGINAL
    assert str(other).encode() in cfg.read_bytes()
    assert uninstall(node) == 0
    assert cfg.read_bytes() == ORIGINAL


def test_missing_file_is_created_and_uninstall_deletes_it(node, capsys):
    cfg = node["config"]
    assert install(node, "--config-version", "2") == 0
    assert "does not exist; creating it" in capsys.readouterr().out
    parsed = tomllib.loads(cfg.read_text())
    assert parsed["version"] == 2
    assert not installer.backup_path(cfg).exists()
    state = json.loads(installer.state_path(cfg).read_text())
    assert state["original_existed"] is False
    assert uninstall(node) == 0
    assert "pyvm created it" in capsys.readouterr().out
    assert not cfg.exists()
    assert not installer.state_path(cfg).exists()


def test_comment_only_file_gets_a_version(node):
    node["config"].write_text("# nothing configured yet\n")
    assert install(node, "--config-version", "3") == 0
    text = node["config"].read_text()
    assert text.startswith("# nothing configured yet\n")
    assert tomllib.loads(text)["version"] == 3
    assert "io.containerd.cri.v1.runtime" in text
    assert uninstall(node) == 0
    assert node["config"].read_text() == "# nothing configured yet\n"


def test_edit_after_install_removes_only_our_table(node, capsys):
    cfg = node["config"]
    cfg.write_bytes(ORIGINAL)
    assert install(node) == 0
    edited = cfg.read_text().replace("version = 2\n", "version = 2\noom_score = -999  # added later\n")
    cfg.write_text(edited)
    capsys.readouterr()
    assert uninstall(node) == 0
    out = capsys.readouterr().out
    assert "was changed since `pyvm install`" in out
    assert "removing only" in out
    text = cfg.read_text()
    assert "oom_score = -999  # added later" in text
    assert "pyvm" not in tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    # not byte-exact (a blank line tomlkit put before our table may stay), but nothing else changed
    want = ORIGINAL.decode().replace("version = 2\n", "version = 2\noom_score = -999  # added later\n")
    assert text.rstrip("\n") == want.rstrip("\n")
    # the original is not thrown away: moved aside, and a later install starts afresh
    leftovers = [p.name for p in cfg.parent.iterdir() if ".pyvm-backup." in p.name]
    assert len(leftovers) == 1
    assert not installer.state_path(cfg).exists()


def test_uninstall_of_a_hand_registered_table(node, capsys):
    cfg = node["config"]
    cfg.write_bytes(
        ORIGINAL + b'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm]\n  runtime_type = "x"\n'
    )
    assert uninstall(node) == 0
    assert "was not written by `pyvm install`" in capsys.readouterr().out
    assert cfg.read_bytes() == ORIGINAL


def test_dry_run_prints_the_diff_and_writes_nothing(node, capsys):
    cfg = node["config"]
    cfg.write_bytes(ORIGINAL)
    assert install(node, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"--- {cfg} (current)" in out
    assert f"+++ {cfg} (pyvm)" in out
    assert '+[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm]' in out
    assert "dry run" in out
    assert cfg.read_bytes() == ORIGINAL
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]

    assert install(node) == 0
    capsys.readouterr()
    installed = cfg.read_bytes()
    assert uninstall(node, "--dry-run") == 0
    out = capsys.readouterr().out
    assert '-[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm]' in out
    assert cfg.read_bytes() == installed


def test_restart_without_systemd_tells_the_user(node, capsys, monkeypatch):
    monkeypatch.setattr(installer.shutil, "which", lambda name: None)
    node["config"].write_bytes(ORIGINAL)
    assert install(node, "--restart") == 1
    err = capsys.readouterr().err
    assert "containerd was not restarted: restart it yourself" in err


def test_restart_uses_systemctl(node, capsys, monkeypatch):
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(installer.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(installer.Path, "is_dir", lambda self: True)
    monkeypatch.setattr(installer.subprocess, "run", lambda argv, **kw: calls.append(argv) or Done())
    node["config"].write_bytes(ORIGINAL)
    assert install(node, "--restart") == 0
    assert calls == [["systemctl", "restart", "containerd"]]
    assert "restarted containerd" in capsys.readouterr().out
    # nothing changed -> no restart
    assert install(node, "--restart") == 0
    assert len(calls) == 1


def test_restart_through_the_host_pid_namespace(monkeypatch):
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(installer.subprocess, "run", lambda argv, **kw: calls.append(argv) or Done())
    assert installer.restart_containerd(host_pid1=True)[0]
    assert calls[0][:3] == ["nsenter", "--target", "1"]
    assert calls[0][-3:] == ["systemctl", "restart", "containerd"]


# -- bad invocations: exit 2, message names the file and the fix -------------------------------------


def test_unparsable_config(node, capsys):
    node["config"].write_text("version = 2\n[plugins\n")
    assert install(node) == 2
    err = capsys.readouterr().err
    assert f"{node['config']} is not valid TOML (line 2" in err
    assert "Fix the file" in err
    assert node["config"].read_text() == "version = 2\n[plugins\n"


def test_unreadable_config(node, capsys, monkeypatch):
    node["config"].write_bytes(ORIGINAL)
    real = Path.read_bytes

    def deny(self):
        if self == node["config"]:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)  # root ignores mode bits, so simulate EACCES
    assert install(node) == 2
    err = capsys.readouterr().err
    assert f"cannot read {node['config']}: permission denied; run as root" in err


def test_unwritable_directory(node, capsys, monkeypatch):
    node["config"].write_bytes(ORIGINAL)
    monkeypatch.setattr(installer.os, "access", lambda path, mode: False)
    assert install(node) == 2
    assert f"cannot write {node['config']}: permission denied" in capsys.readouterr().err
    assert node["config"].read_bytes() == ORIGINAL


def test_config_is_a_directory(node, capsys):
    node["config"].mkdir()
    assert install(node) == 2
    assert "is a directory" in capsys.readouterr().err


def test_missing_parent_directory(tmp_path, node, capsys):
    cfg = tmp_path / "nope" / "config.toml"
    assert run("install", "--containerd-config", cfg, "--config-path", node["pyvm"]) == 2
    err = capsys.readouterr().err
    assert f"the directory {cfg.parent} does not exist" in err
    assert "mkdir -p" in err


def test_not_utf8(node, capsys):
    node["config"].write_bytes(b"version = 2\n# \xff\xfe\n")
    assert install(node) == 2
    assert "is not UTF-8" in capsys.readouterr().err


def test_schema_1_config(node, capsys):
    node["config"].write_text('[plugins.cri]\n  sandbox_image = "x"\n')
    assert install(node) == 2
    err = capsys.readouterr().err
    assert str(node["config"]) in err
    assert "version = 2" in err


def test_missing_pyvm_configuration(node, tmp_path, capsys):
    missing = tmp_path / "absent.toml"
    assert run("install", "--containerd-config", node["config"], "--config-path", missing) == 2
    err = capsys.readouterr().err
    assert f"pyvm configuration {missing} does not exist" in err
    assert "--skip-config-check" in err
    assert not node["config"].exists()
    assert (
        run("install", "--containerd-config", node["config"], "--config-path", missing, "--skip-config-check")
        == 0
    )


def test_relative_paths_are_refused(node, capsys):
    assert run("install", "--containerd-config", node["config"], "--config-path", "conf.toml") == 2
    assert "must be absolute" in capsys.readouterr().err
    assert install(node, "--runtime-path", "bin/shim") == 2
    assert "--runtime-path bin/shim must be an absolute path" in capsys.readouterr().err


def test_damaged_state_record(node, capsys):
    node["config"].write_bytes(ORIGINAL)
    assert install(node) == 0
    installer.state_path(node["config"]).write_text("{not json")
    assert uninstall(node) == 2
    err = capsys.readouterr().err
    assert "install record) is damaged" in err
    assert str(installer.backup_path(node["config"])) in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        run("install", "--help")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--containerd-config", "--config-path", "--dry-run", "--restart"):
        assert opt in out
