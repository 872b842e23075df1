"""A host's instance storage as this process sees it: instance directories,
their disks, probe files, and the host's records.

``<root>`` is the host's instances_path.  Per instance: ``<root>/<uuid>/``
with ``disk`` (a sparse raw file of the flavor's size), ``libvirt.xml``
(the domain definition, as Nova keeps it) and ``console.log``; a
same-host resize keeps the old directory as ``<root>/<uuid>_resize``.

Records live in ``<root>/.migrateflow/<host>/`` so hosts sharing a root
keep them apart: ``<uuid>.json`` says the host holds something of the
instance here (its VIFs plugged, its volumes connected, the host a cold
migration copied it from), ``<uuid>.job.json`` is the live-migration job
started from the host.  Plugging into a real integration bridge (os-vif)
and connecting real volumes (os-brick) are not done by this driver yet:
the record is what it plugged and connected.

Every write goes to a temporary name first and is renamed into place, so a
crash never leaves half a file under the final name (a re-run finds either
nothing or the whole result).
"""
import contextlib
import os

from migrateflow.drivers.libvirt import connection, files

GIB = 1 << 30
RECORDS = ".migrateflow"
BRIDGE = "br-int"


class HostStorage:
    """The instance storage of one host."""

    def __init__(self, settings, host):
        self.host = host
        self.root = connection.instances_root(settings, host)

    # -- paths -------------------------------------------------------------------
    def instance_dir(self, uuid):
        return os.path.join(self.root, uuid)

    def disk(self, uuid):
        return os.path.join(self.root, uuid, "disk")

    def domain_xml_file(self, uuid):
        return os.path.join(self.root, uuid, "libvirt.xml")

    def console_log(self, uuid):
        return os.path.join(self.root, uuid, "console.log")

    def backup_dir(self, uuid):
        return os.path.join(self.root, f"{uuid}_resize")

    def probe(self, uuid, purpose=None):
        """The shared-storage probe of a check (one per instance and purpose:
        a repeated check or a cleanup without the check's reply finds it)."""
        name = f"probe-{purpose}-{uuid}" if purpose else f"probe-{uuid}"
        return os.path.join(self.root, name)

    def _records(self, host=None):
        return os.path.join(self.root, RECORDS, host or self.host)

    def _record(self, uuid):
        return os.path.join(self._records(), f"{uuid}.json")

    def _job(self, uuid):
        return os.path.join(self._records(), f"{uuid}.job.json")

    def shares_with(self, other):
        """Both hosts' instances paths are one directory."""
        try:
            return os.path.samefile(self.root, other.root)
        except FileNotFoundError:
            return os.path.abspath(self.root) == os.path.abspath(other.root)

    # -- files ---------------------------------------------------------------------
    def ensure_root(self):
        os.makedirs(self.root, exist_ok=True)

    def supports_direct_io(self):
        """Files here can be opened with O_DIRECT (Nova's check)."""
        self.ensure_root()
        path = os.path.join(self.root, f".directio-{os.getpid()}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def has_disk(self, uuid):
        return os.path.isfile(self.disk(uuid))

    def disk_gb(self, uuid):
        """Size of the instance's disk here (GiB, rounded up), None if absent."""
        try:
            return -(-os.path.getsize(self.disk(uuid)) // GIB)
        except FileNotFoundError:
            return None

    def disk_bytes(self, uuid):
        try:
            return os.path.getsize(self.disk(uuid))
        except FileNotFoundError:
            return None

    def ensure_instance_dir(self, uuid, disk_bytes=None):
        """Make the instance directory and, with ``disk_bytes``, an empty
        sparse disk of that size; True if anything was made."""
        made = not os.path.isdir(self.instance_dir(uuid))
        os.makedirs(self.instance_dir(uuid), exist_ok=True)
        if disk_bytes is not None and not self.has_disk(uuid):
            tmp = self.disk(uuid) + ".partial"
            with open(tmp, "wb") as f:
                f.truncate(int(disk_bytes))
            os.replace(tmp, self.disk(uuid))
            made = True
        return made

    def grow_disk(self, uuid, disk_gb):
        """Grow (never shrink) the disk to ``disk_gb``; True if it grew."""
        if (self.disk_gb(uuid) or 0) >= disk_gb or not self.has_disk(uuid):
            return False
        os.truncate(self.disk(uuid), int(disk_gb) * GIB)
        return True

    def restore_backup(self, uuid):
        """Same-host revert: the kept old directory replaces the resized
        one (in steps a re-run completes); True if anything changed."""
        current, backup = self.instance_dir(uuid), self.backup_dir(uuid)
        old = current + ".reverted"
        changed = False
        if os.path.isdir(backup):
            if os.path.isdir(current):
                files.remove(old)
                os.replace(current, old)
            os.replace(backup, current)
            changed = True
        return files.remove(old) or changed

    def write_file(self, path, text):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def read_domain_xml(self, uuid):
        try:
            with open(self.domain_xml_file(uuid)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def touch_probe(self, path):
        """Write the probe file (in this root whatever root ``path`` names)."""
        self.ensure_root()
        target = os.path.join(self.root, os.path.basename(path))
        if os.path.exists(target):
            return False
        self.write_file(target, self.host + "\n")
        return True

    def sees(self, path):
        return os.path.exists(os.path.join(self.root, os.path.basename(path)))

    def remove_probe(self, path):
        return files.remove(os.path.join(self.root, os.path.basename(path)))

    def remove(self, path):
        return files.remove(path)

    def holders(self, uuid):
        """Hosts with a record of the instance in this root, this one first."""
        base = os.path.join(self.root, RECORDS)
        try:
            hosts = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        found = [h for h in hosts if os.path.isfile(os.path.join(base, h, f"{uuid}.json"))]
        return sorted(found, key=lambda h: h != self.host)

    def drop_instance_dir(self, uuid):
        """Remove the instance directory unless another host with a record
        of the instance shares this root (it still uses the disk)."""
        if [h for h in self.holders(uuid) if h != self.host]:
            return False
        return files.remove(self.instance_dir(uuid))

    # -- records: what this host holds of an instance ---------------------------------
    def record(self, uuid):
        return files.read_json(self._record(uuid))

    def hold(self, uuid, **values):
        """Create or update the record; True if it changed."""
        old = self.record(uuid)
        new = {"vifs": [], "volumes": [], "from_host": None, **(old or {}), **values}
        if new == old:
            return False
        files.write_json(self._record(uuid), new)
        return True

    def plug(self, uuid, network_info, block_device_info):
        """Record the instance's VIFs as plugged into the integration bridge
        and its volumes as connected here; True if that changed anything."""
        rec = self.record(uuid) or {}
        vifs = {v["port_id"]: v for v in rec.get("vifs", [])}
        for vif in network_info or ():
            port = vif["port_id"]
            vifs.setdefault(port, {"port_id": port, "mac": vif.get("mac"),
                                   "device": f"tap{port[:11]}", "bridge": BRIDGE})
        volumes = {v["volume_id"]: v for v in rec.get("volumes", [])}
        for bdm in block_device_info or ():
            volumes.setdefault(bdm["volume_id"], {"volume_id": bdm["volume_id"],
                                                  "device": bdm.get("device")})
        return self.hold(uuid, vifs=[vifs[k] for k in sorted(vifs)],
                         volumes=[volumes[k] for k in sorted(volumes)])

    def unplug(self, uuid):
        """Unplug the VIFs and disconnect the volumes; the record stays."""
        rec = self.record(uuid)
        if rec is None or not (rec["vifs"] or rec["volumes"]):
            return False
        return self.hold(uuid, vifs=[], volumes=[])

    def forget(self, uuid):
        """The host holds nothing of the instance any more (VIFs unplugged,
        volumes disconnected, no job); True if it held something."""
        forgot = files.remove(self._record(uuid))
        return files.remove(self._job(uuid)) or forgot

    def attachments(self):
        """{uuid: record} of every instance this host holds."""
        base = self._records()
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return {}
        return {name[:-5]: files.read_json(os.path.join(base, name)) for name in names
                if name.endswith(".json") and not name.endswith(".job.json")}

    # -- the live-migration job started from this host -----------------------------------
    def job(self, uuid):
        return files.read_json(self._job(uuid))

    def save_job(self, uuid, job):
        files.write_json(self._job(uuid), job)
