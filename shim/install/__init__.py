"""Node installation of pyvm: containerd registration and the Kubernetes installer.

A node tool used by ``shim.cli`` only; the runtime layers (api, service, sandbox, resources) never
import it.
"""
