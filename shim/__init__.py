"""pyvm: a containerd runtime-v2 shim that runs each pod in its own QEMU VM."""

__version__ = "0.1.0"
__all__ = ["__version__"]
