"""The libvirt driver (libvirt-python; ``pip install migrateflow[libvirt]``).

Loaded by name: ``[DEFAULT] compute_driver = libvirt``.
"""
from migrateflow.drivers.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
