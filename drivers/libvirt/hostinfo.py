"""Host facts from libvirt: capabilities, memory, disk, CPU compatibility."""
import os
import xml.etree.ElementTree as ET

import libvirt

from migrateflow import exceptions
from migrateflow.drivers.libvirt.connection import libvirt_errors, unsupported

MIB = 1 << 20
GIB = 1 << 30


def cpu_facts(conn):
    """(arch, model, sorted features) of the host CPU from its capabilities."""
    cpu = ET.fromstring(conn.getCapabilities()).find("host/cpu")
    arch = (cpu.findtext("arch") if cpu is not None else None) or conn.getInfo()[0]
    model = (cpu.findtext("model") if cpu is not None else None) or conn.getInfo()[0]
    features = set()
    if cpu is not None:
        features.update(f.get("name") for f in cpu.findall("feature") if f.get("name"))
        for group in cpu.findall("features"):
            features.update(child.tag for child in group)
    return arch, model, sorted(features)


def memory_mb(conn):
    """(total, free) MiB: free is what the running guests leave, and no
    more than the hypervisor reports free (when it reports anything)."""
    total = conn.getInfo()[1]
    used = 0
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            used += dom.info()[1] // 1024
        except libvirt.libvirtError as err:   # an incoming guest torn down meanwhile
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    free = total - used
    reported = conn.getFreeMemory() // MIB     # the test driver says 0: unknown
    if reported > 0:
        free = min(free, reported)
    return total, free


def disk_gb(conn, settings, storage):
    """(total, free) GiB of the instance storage: the configured pool's
    figures when there is one, else the file system of the instances path."""
    if settings.disk_pool:
        with libvirt_errors(f"reading storage pool {settings.disk_pool} of {storage.host}"):
            pool = conn.storagePoolLookupByName(settings.disk_pool)
            try:
                pool.refresh(0)
            except libvirt.libvirtError as err:
                if not unsupported(err):
                    raise
            _state, capacity, _allocation, available = pool.info()
        return capacity // GIB, available // GIB
    storage.ensure_root()
    st = os.statvfs(storage.root)
    return st.f_blocks * st.f_frsize // GIB, st.f_bavail * st.f_frsize // GIB


def host_info(conn, settings, storage):
    with libvirt_errors(f"reading the facts of host {storage.host}"):
        _arch, model, features = cpu_facts(conn)
        memory_total, memory_free = memory_mb(conn)
        hv_type, hv_version = conn.getType(), conn.getVersion()
    disk_total, disk_free = disk_gb(conn, settings, storage)
    return {"hypervisor_type": hv_type, "hypervisor_version": int(hv_version),
            "cpu_model": model, "cpu_features": features,
            "memory_mb": int(memory_total), "memory_free_mb": int(memory_free),
            "disk_gb": int(disk_total), "disk_free_gb": int(disk_free)}


def cpu_xml(arch, source_cpu):
    """A host-CPU description of ``source_cpu`` for compareCPU."""
    cpu = ET.Element("cpu")
    ET.SubElement(cpu, "arch").text = arch
    ET.SubElement(cpu, "model").text = source_cpu["cpu_model"]
    for name in sorted(source_cpu.get("cpu_features") or ()):
        ET.SubElement(cpu, "feature", name=name)
    return ET.tostring(cpu, encoding="unicode")


def compare_cpu(conn, host, source_cpu):
    """Raise CPUIncompatible unless ``host`` can run guests started on
    ``source_cpu``.  libvirt decides (compareCPU); where the connection
    cannot compare (the test driver), the feature lists do."""
    with libvirt_errors(f"reading the CPU of host {host}"):
        arch, model, features = cpu_facts(conn)
    missing = sorted(set(source_cpu.get("cpu_features") or ()) - set(features))
    try:
        result = conn.compareCPU(cpu_xml(arch, source_cpu), 0)
    except libvirt.libvirtError as err:
        if not unsupported(err):
            raise exceptions.CPUIncompatible(
                f"host {host} cannot compare its CPU ({model}) with source CPU "
                f"{source_cpu.get('cpu_model')}: {err.get_error_message()}") from err
        result = (libvirt.VIR_CPU_COMPARE_INCOMPATIBLE if missing
                  else libvirt.VIR_CPU_COMPARE_SUPERSET)
    if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
        lacking = ", ".join(missing) or "(per libvirt)"
        raise exceptions.CPUIncompatible(
            f"host {host} ({model}) lacks CPU features {lacking} of source CPU "
            f"{source_cpu.get('cpu_model')}")
