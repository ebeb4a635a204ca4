"""hypervisor"""
