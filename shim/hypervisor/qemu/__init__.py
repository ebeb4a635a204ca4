"""hypervisor/qemu"""
