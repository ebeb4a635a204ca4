"""Editing containerd's config.toml: tomlkit edits of v2/v3 configs, idempotency, comments survive."""

from __future__ import annotations

import shutil
import subprocess
import tomllib

import pytest

from shim.errors import InvalidArgument
from shim.install import containerd_config as cc

ENTRY = cc.RuntimeEntry(config_path="/etc/pyvm/configuration.toml")


@pytest.fixture(scope="module")
def default_config() -> str:
    """`containerd config default` of the installed containerd (1.6 here), generated at test time."""
    exe = shutil.which("containerd")
    if exe is None:
        pytest.skip("containerd is not installed (hack/setup.sh installs it)")
    return subprocess.run([exe, "config", "default"], check=True, capture_output=True, text=True).stdout


def _runtimes(text: str, version: int) -> dict:
    node = tomllib.loads(text)
    for key in cc.runtimes_path(version):
        node = node[key]
    return node


def _edit(text: str) -> tuple[str, bool]:
    doc = cc.parse(text, "config.toml")
    version = cc.schema_version(doc, "config.toml")
    changed = cc.apply(doc, version, ENTRY, "config.toml")
    return cc.dumps(doc), changed


def test_default_config_gains_exactly_our_table(default_config):
    out, changed = _edit(default_config)
    assert changed
    runtimes = _runtimes(out, 2)
    assert runtimes["pyvm"] == {
        "runtime_type": "io.containerd.pyvm.v2",
        "pod_annotations": ["io.pyvm.*"],
        "privileged_without_host_devices": True,
        "options": {"ConfigPath": "/etc/pyvm/configuration.toml"},
    }
    # every other setting is untouched
    before, after = tomllib.loads(default_config), tomllib.loads(out)
    del _runtimes(out, 2)["pyvm"]
    after_runtimes = after["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    after_runtimes.pop("pyvm")
    assert after == before
    # and the text only grew by our lines, indented like the runc sibling
    diff = cc.unified_diff(default_config, out, "config.toml")
    removed = [ln for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    assert removed == []
    assert '\n        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm]\n' in out


def test_default_config_second_apply_changes_nothing(default_config):
    out, _ = _edit(default_config)
    again, changed = _edit(out)
    assert not changed
    assert again == out


def test_remove_restores_the_default_config_text(default_config):
    out, _ = _edit(default_config)
    doc = cc.parse(out, "x")
    assert cc.remove(doc, 2)
    assert cc.dumps(doc) == default_config
    assert not cc.remove(doc, 2)


COMMENTED_V2 = """\
# site-wide containerd settings -- managed by ops
version = 2
root = "/var/lib/containerd"  # keep on the big disk

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      # runtimes below
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true   # cgroup v2 + systemd
"""


def test_comments_and_other_settings_survive():
    out, changed = _edit(COMMENTED_V2)
    assert changed
    assert out.startswith(COMMENTED_V2)  # everything before is kept verbatim, we only append
    for comment in (
        "# site-wide containerd",
        "# keep on the big disk",
        "# runtimes below",
        "# cgroup v2 + systemd",
    ):
        assert comment in out
    parsed = tomllib.loads(out)
    assert parsed["root"] == "/var/lib/containerd"
    assert _runtimes(out, 2)["runc"]["options"]["SystemdCgroup"] is True
    assert _runtimes(out, 2)["pyvm"]["options"]["ConfigPath"] == "/etc/pyvm/configuration.toml"


V3 = """\
version = 3

[plugins]
  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
"""


def test_v3_config_uses_the_containerd2_plugin():
    out, changed = _edit(V3)
    assert changed
    # tomlkit writes the header in the file's own quoting style
    assert "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.pyvm]" in out
    assert _runtimes(out, 3)["pyvm"]["runtime_type"] == "io.containerd.pyvm.v2"
    assert "io.containerd.grpc.v1.cri" not in out
    assert _edit(out) == (out, False)


def test_config_without_runtimes_gets_runc_too():
    """containerd 1.6 replaces its built-in runtimes map with the file's; without runc, CRI fails to load."""
    debian = (
        "version = 2\n\n[plugins]\n"
        '  [plugins."io.containerd.grpc.v1.cri"]\n'
        '    [plugins."io.containerd.grpc.v1.cri".cni]\n      bin_dir = "/usr/lib/cni"\n'
    )
    out, changed = _edit(debian)
    assert changed
    runtimes = _runtimes(out, 2)
    assert runtimes["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    assert set(runtimes) == {"runc", "pyvm"}
    assert tomllib.loads(out)["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"] == "/usr/lib/cni"


def test_custom_default_runtime_is_left_to_the_user():
    text = (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n  default_runtime_name = "crun"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]\n  runtime_type = "io.containerd.runc.v2"\n'
    )
    out, _ = _edit(text)
    assert set(_runtimes(out, 2)) == {"crun", "pyvm"}


def test_new_document_is_accepted_and_minimal():
    doc = cc.new_document(2)
    assert cc.apply(doc, 2, ENTRY, "new")
    parsed = tomllib.loads(cc.dumps(doc))
    assert parsed["version"] == 2
    assert set(_runtimes(cc.dumps(doc), 2)) == {"runc", "pyvm"}


def test_existing_pyvm_table_is_updated_in_place_keeping_user_keys():
    text = COMMENTED_V2 + (
        '      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm]\n'
        '        runtime_type = "io.containerd.pyvm.v2"\n'
        '        container_annotations = ["io.pyvm.*"]  # added by hand\n'
        '        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyvm.options]\n'
        '          ConfigPath = "/old/path.toml"\n'
    )
    out, changed = _edit(text)
    assert changed
    pyvm = _runtimes(out, 2)["pyvm"]
    assert pyvm["options"]["ConfigPath"] == "/etc/pyvm/configuration.toml"
    assert pyvm["container_annotations"] == ["io.pyvm.*"]
    assert "# added by hand" in out
    assert pyvm["pod_annotations"] == ["io.pyvm.*"]


def test_runtime_path_is_written_when_given():
    entry = cc.RuntimeEntry(config_path="/c.toml", runtime_path="/opt/pyvm/bin/containerd-shim-pyvm-v2")
    doc = cc.parse(COMMENTED_V2, "x")
    cc.apply(doc, 2, entry, "x")
    assert _runtimes(cc.dumps(doc), 2)["pyvm"]["runtime_path"] == "/opt/pyvm/bin/containerd-shim-pyvm-v2"
    assert not cc.entry_matches(doc, 2, ENTRY)  # a different entry is not "already there"


def test_parse_error_names_file_line_and_fix():
    with pytest.raises(InvalidArgument) as err:
        cc.parse('version = 2\n[plugins\nx = "', "/etc/containerd/config.toml")
    msg = str(err.value)
    assert msg.startswith("/etc/containerd/config.toml is not valid TOML (line 2")
    assert "Fix the file" in msg


def test_schema_1_config_is_refused_with_the_migration_hint():
    doc = cc.parse('[plugins.cri]\n  sandbox_image = "x"\n', "/etc/containerd/config.toml")
    with pytest.raises(InvalidArgument, match=r"no 'version' key.*version = 2"):
        cc.schema_version(doc, "/etc/containerd/config.toml")


@pytest.mark.parametrize("version", ["1", "4", '"2"', "true"])
def test_unsupported_versions_are_refused(version):
    doc = cc.parse(f"version = {version}\n", "c.toml")
    with pytest.raises(InvalidArgument, match=r"c\.toml: config version .* is not supported"):
        cc.schema_version(doc, "c.toml")


def test_inline_table_parent_is_refused_naming_the_key():
    text = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  containerd = { snapshotter = "overlayfs" }\n'
    )
    doc = cc.parse(text, "c.toml")
    with pytest.raises(
        InvalidArgument, match=r"'plugins.\"io.containerd.grpc.v1.cri\".containerd' is written"
    ):
        cc.apply(doc, 2, ENTRY, "c.toml")


def test_unified_diff_is_empty_for_equal_text():
    assert cc.unified_diff("a\n", "a\n", "p") == ""
    assert cc.unified_diff("", "a\n", "p").startswith("--- /dev/null\n+++ p (pyvm)\n")
