"""The guest brings ``lo`` up: pod containers share the VM's network namespace and need 127.0.0.1."""

import os
import subprocess
import sys

import pytest

SNIPPET = (
    "from shim.guestagent.guest import loopback_up\n"
    "print(loopback_up(), loopback_up())\n"
    "print(open('/sys/class/net/lo/flags').read().strip())\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
def test_loopback_up_in_a_fresh_network_namespace():
    r = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    first, flags = r.stdout.splitlines()
    assert first == "True False"  # was down, then already up
    assert int(flags, 16) & 0x1
