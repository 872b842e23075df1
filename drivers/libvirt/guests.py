"""Guests as libvirt domains: lookup by instance uuid (the domain's uuid),
power state, the domain XML this driver defines, and its edits (flavor,
paths on another host)."""
import contextlib
import time
import xml.etree.ElementTree as ET

import libvirt

from migrateflow import exceptions
from migrateflow.states import PowerState

#: libvirt domain states → power states (Nova's mapping, folded to ours)
POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PAUSED,
}
#: the domain's metadata keeps the flavor's disk size (libvirt has no such figure)
XMLNS = "https://migrateflow.invalid/xmlns/libvirt/1"
ET.register_namespace("migrateflow", XMLNS)
RUNNING, PAUSED, SHUTDOWN = (PowerState.RUNNING.value, PowerState.PAUSED.value,
                             PowerState.SHUTDOWN.value)
_POLL_S = 0.2
#: XMLDesc flags: the definition to give another host, and to define anew
XML_MIGRATABLE = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
XML_INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def find(conn, uuid):
    """The domain of the instance, or None."""
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise exceptions.DriverError(
            f"looking up guest {uuid}: {err.get_error_message()}") from err


def _state(dom):
    """(state, reason), or None once the domain is gone: a transient one
    (an incoming migration) can vanish between lookup and look."""
    try:
        return dom.state()
    except libvirt.libvirtError as err:
        if _gone(err):
            return None
        raise exceptions.DriverError(
            f"reading the state of guest {dom.UUIDString()}: {err.get_error_message()}"
        ) from err


def power_state(dom):
    """Our PowerState value of the domain; None when it vanished."""
    state = _state(dom)
    return None if state is None else POWER_STATES.get(state[0], PowerState.NOSTATE).value


def paused_for_post_copy(dom):
    state = _state(dom)
    return state is not None and state[0] == libvirt.VIR_DOMAIN_PAUSED and state[1] in (
        libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)


def view(dom):
    """get_guest's dict, None when the domain vanished meanwhile."""
    try:
        return {"uuid": dom.UUIDString(), "name": dom.name(), "state": power_state(dom),
                "persistent": bool(dom.isPersistent())}
    except libvirt.libvirtError as err:
        if _gone(err):
            return None
        raise exceptions.DriverError(
            f"reading guest {dom.UUIDString()}: {err.get_error_message()}") from err


def flavor(dom):
    """{memory_mb, vcpus, disk_gb} the guest is defined with (its next
    boot's); disk_gb is None for a domain this driver did not define."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
    root = ET.fromstring(dom.XMLDesc(flags))
    memory = int(root.findtext("memory"))
    unit = root.find("memory").get("unit", "KiB")
    mark = root.find(f"metadata/{{{XMLNS}}}flavor")
    disk = mark.get("disk_gb") if mark is not None else None
    return {"memory_mb": _to_mib(memory, unit), "vcpus": int(root.findtext("vcpu")),
            "disk_gb": int(disk) if disk is not None else None}


def _mark_flavor(root, disk_gb):
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(3, metadata)
    mark = metadata.find(f"{{{XMLNS}}}flavor")
    if mark is None:
        mark = ET.SubElement(metadata, f"{{{XMLNS}}}flavor")
    mark.set("disk_gb", str(int(disk_gb or 0)))


def _to_mib(value, unit):
    scale = {"b": 1 / 1048576, "bytes": 1 / 1048576, "k": 1 / 1024, "kib": 1 / 1024,
             "m": 1, "mib": 1, "g": 1024, "gib": 1024}
    return int(value * scale[unit.lower()])


def domain_xml(settings, domain_type, instance, storage):
    """The definition of a new guest for ``instance`` on ``storage``'s host."""
    uuid = instance["uuid"]
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = instance["name"]
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(int(instance["memory_mb"]))
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(int(instance["memory_mb"]))
    ET.SubElement(dom, "vcpu").text = str(int(instance["vcpus"]))
    _mark_flavor(dom, instance.get("disk_gb"))
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    if settings.guest_kernel and domain_type != "test":
        ET.SubElement(os_el, "kernel").text = settings.guest_kernel
        if settings.guest_initrd:
            ET.SubElement(os_el, "initrd").text = settings.guest_initrd
        cmdline = settings.guest_cmdline.replace("{name}", instance["name"])
        ET.SubElement(os_el, "cmdline").text = cmdline.replace("{uuid}", uuid)
    if domain_type != "test":
        # ACPI: the guest's power button (a clean shutdown) and, from QEMU
        # 9.0 on, no -no-acpi for libvirt to pass (QEMU removed it)
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
    _cpu(dom, settings, domain_type)
    ET.SubElement(dom, "on_reboot").text = "restart"
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    if domain_type != "test":
        # cache=none (O_DIRECT) is what libvirt wants for a live migration;
        # a file system without O_DIRECT (tmpfs) cannot have it
        cache = "none" if storage.supports_direct_io() else "writethrough"
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache=cache)
    ET.SubElement(disk, "source", file=storage.disk(uuid))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if domain_type != "test":
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=storage.console_log(uuid), append="on")
        ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def _cpu(dom, settings, domain_type):
    mode = settings.cpu_mode or ("host-model" if settings.virt_type == "kvm" else "none")
    if domain_type == "test" or mode == "none":
        return
    if mode == "custom":
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
        ET.SubElement(cpu, "model", fallback="forbid").text = settings.cpu_model
    else:
        ET.SubElement(dom, "cpu", mode=mode)


def with_flavor(xml, flavor):
    """``xml`` with the flavor's memory and vcpus."""
    root = ET.fromstring(xml)
    for tag in ("memory", "currentMemory"):
        el = root.find(tag)
        if el is None:
            el = ET.SubElement(root, tag)
        el.text, el.attrib = str(int(flavor["memory_mb"])), {"unit": "MiB"}
    root.find("vcpu").text = str(int(flavor["vcpus"]))
    _mark_flavor(root, flavor.get("disk_gb"))
    return ET.tostring(root, encoding="unicode")


def moved(xml, old_dir, new_dir):
    """``xml`` with every file under ``old_dir`` moved under ``new_dir`` (the
    instance directory on another host), and without a live id."""
    if old_dir.rstrip("/") == new_dir.rstrip("/"):
        return xml
    old, new = old_dir.rstrip("/") + "/", new_dir.rstrip("/") + "/"
    root = ET.fromstring(xml)
    root.attrib.pop("id", None)
    for el in root.iter():
        for key in ("file", "path"):
            value = el.get(key)
            if value and value.startswith(old):
                el.set(key, new + value[len(old):])
        if el.tag in ("kernel", "initrd") and el.text and el.text.startswith(old):
            el.text = new + el.text[len(old):]
    return ET.tostring(root, encoding="unicode")


def domain_type_of(conn, settings):
    """The in-process test driver only runs domains of type 'test'."""
    return "test" if conn.getType().upper() == "TEST" else settings.virt_type


def start(dom):
    """Running afterwards: started when off, resumed when paused."""
    state = power_state(dom)
    if state == SHUTDOWN or state == PowerState.NOSTATE:
        dom.create()
        return True
    if state == PAUSED:
        dom.resume()
        return True
    return False


def stop(dom, timeout):
    """Shut off afterwards: a clean shutdown for up to ``timeout`` s, then
    powered off; True if it was running."""
    if not dom.isActive():
        return False
    if timeout:
        with contextlib.suppress(libvirt.libvirtError):
            dom.shutdown()
        deadline = time.monotonic() + timeout
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    if dom.isActive():
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if dom.isActive():
                raise exceptions.DriverError(
                    f"powering off guest {dom.UUIDString()}: {err.get_error_message()}"
                ) from err
    return True


def remove(dom):
    """Powered off and undefined; True if anything changed.  A domain that
    vanishes meanwhile (a transient incoming guest of an aborted migration)
    is removed already."""
    changed = False
    try:
        if dom.isActive():
            dom.destroy()
            changed = True
        if dom.isPersistent():
            flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                     | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as err:
                if _gone(err):
                    raise
                dom.undefine()
            changed = True
    except libvirt.libvirtError as err:
        if not _gone(err):
            raise
    return changed


def _gone(err):
    return err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
