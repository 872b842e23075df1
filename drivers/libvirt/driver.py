"""LibvirtDriver: the driver contract (drivers/base.py) on libvirt-python.

Hosts are reached by name through ``[libvirt] connection_uri_template``
(or ``connection_uris``); a guest is the domain whose uuid is the
instance's.  The instance directories of every host are files this process
reads and writes (``[libvirt] instances_path``, see ``storage``): the
shared-storage probe, the disk copy of a cold migration and the VIF and
volume records are done there.

Every method looks at the real state first (domain, files, records) and
does only what is missing, so a re-run after a crash is harmless.  libvirt
errors become DriverError naming what failed.
"""
import functools
import logging
import os

from migrateflow import exceptions
from migrateflow.drivers import base
from migrateflow.drivers.libvirt import cold, guests, hostinfo, live
from migrateflow.drivers.libvirt.connection import Connections, Settings, libvirt_errors
from migrateflow.drivers.libvirt.storage import GIB, HostStorage

LOG = logging.getLogger(__name__)


class LibvirtDriver(live.LiveMigration, cold.ColdMigration, base.ComputeDriver):
    """Hypervisors reached through libvirt; see the module docstring."""

    def __init__(self, settings=None):
        self.settings = settings or Settings()
        self.connections = Connections(self.settings)
        #: (source, instance uuid) -> {"thread", "downtime_ms"}: jobs this process runs
        self._threads = {}

    @classmethod
    def cache_key(cls, conf):
        return (Settings.from_conf(conf),)

    @classmethod
    def from_conf(cls, conf):
        return cls(Settings.from_conf(conf))

    def _conn(self, host):
        return self.connections.get(host)

    def _storage(self, host):
        return HostStorage(self.settings, host)

    def connection(self, host):
        """The open libvirt connection of ``host`` (tests and tools)."""
        return self._conn(host)

    def _guest(self, host, uuid):
        """The domain of the instance on ``host``; DriverError if none."""
        dom = guests.find(self._conn(host), uuid)
        if dom is None:
            raise exceptions.DriverError(f"no guest {uuid} on {host}")
        return dom

    def _others_run(self, host, uuid, other):
        """The guest runs on ``other`` (a host name or None)."""
        if not other or other == host:
            return False
        dom = guests.find(self._conn(other), uuid)
        return dom is not None and guests.power_state(dom) == guests.RUNNING

    # -- host facts -----------------------------------------------------------------
    def get_host_info(self, host):
        return hostinfo.host_info(self._conn(host), self.settings, self._storage(host))

    def compare_cpu(self, host, source_cpu):
        hostinfo.compare_cpu(self._conn(host), host, source_cpu)

    def get_guest(self, host, instance_uuid):
        dom = guests.find(self._conn(host), instance_uuid)
        return guests.view(dom) if dom is not None else None

    def list_guests(self, host):
        with libvirt_errors(f"listing the guests of {host}"):
            doms = self._conn(host).listAllDomains(0)
        found = (guests.view(d) for d in doms)
        return sorted((g for g in found if g is not None), key=lambda g: g["uuid"])

    # -- checks ----------------------------------------------------------------------------
    def check_can_live_migrate_destination(self, dest, instance, source_host_info,
                                           block_migration):
        uuid = instance["uuid"]
        storage = self._storage(dest)
        info = self.get_host_info(dest)
        self.compare_cpu(dest, source_host_info)
        disk_free = info["disk_free_gb"]
        if block_migration and disk_free < (instance.get("disk_gb") or 0):
            raise exceptions.InsufficientResources(
                f"host {dest} has {disk_free} GB free, instance {uuid} needs "
                f"{instance['disk_gb']} GB for a block migration")
        probe = storage.probe(uuid)
        storage.touch_probe(probe)
        return {"dest": dest, "probe_file": probe, "disk_available_gb": disk_free,
                "block_migration": block_migration}

    def cleanup_live_migration_destination_check(self, dest, instance, dest_check_data):
        storage = self._storage(dest)
        storage.remove_probe((dest_check_data or {}).get("probe_file")
                             or storage.probe(instance["uuid"]))

    def check_can_live_migrate_source(self, source, instance, dest_check_data):
        self._conn(source)
        shared = self._storage(source).sees(dest_check_data["probe_file"])
        return base.source_migrate_data(source, instance, dest_check_data, shared)

    # -- destination preparation ----------------------------------------------------------
    def pre_live_migration(self, dest, instance, block_device_info, network_info,
                           migrate_data):
        uuid = instance["uuid"]
        self._conn(dest)
        storage = self._storage(dest)
        migrate_data = dict(migrate_data or {})
        # the copy's target: block migration writes into an existing file
        # of the source disk's size (libvirt pre-creates only pool volumes)
        size = None
        if migrate_data.get("block_migration"):
            source = migrate_data.get("source")
            size = (source and self._storage(source).disk_bytes(uuid)) or \
                (instance.get("disk_gb") or 0) * GIB
        storage.ensure_instance_dir(uuid, size)
        storage.plug(uuid, network_info, block_device_info)
        return migrate_data

    def rollback_live_migration_at_destination(self, dest, instance, block_device_info,
                                               network_info, migrate_data):
        uuid = instance["uuid"]
        migrate_data = migrate_data or {}
        source = migrate_data.get("source")
        storage = self._storage(dest)
        dom = guests.find(self._conn(dest), uuid)
        if dom is not None and guests.power_state(dom) == guests.RUNNING \
                and not self._others_run(dest, uuid, source):
            LOG.warning("not rolling back %s on %s: it is the only running copy", uuid, dest)
            return
        if dom is not None:
            with libvirt_errors(f"removing the incoming guest {uuid} from {dest}"):
                guests.remove(dom)
        storage.forget(uuid)
        shared = migrate_data.get("is_shared_instance_path")
        if shared is None and source:
            shared = storage.shares_with(self._storage(source))
        if not shared:
            storage.drop_instance_dir(uuid)

    # -- after the guest runs on the destination --------------------------------------------
    def post_live_migration_at_source(self, source, instance, block_device_info,
                                      network_info):
        uuid = instance["uuid"]
        dom = guests.find(self._conn(source), uuid)
        if (dom is not None and guests.power_state(dom) == guests.RUNNING) or \
                self._running_stats(dom) is not None or self._thread_alive(source, uuid):
            raise exceptions.DriverError(
                f"guest {uuid} still runs or migrates on {source}; not cleaning up")
        if dom is not None:
            with libvirt_errors(f"undefining the leftover guest {uuid} on {source}"):
                guests.remove(dom)
        self._storage(source).forget(uuid)

    def post_live_migration_at_destination(self, dest, instance, network_info,
                                           block_migration):
        uuid = instance["uuid"]
        dom = self._guest(dest, uuid)
        store = self._storage(dest)
        with libvirt_errors(f"settling guest {uuid} on {dest}"):
            if not dom.isPersistent():
                self._conn(dest).defineXML(dom.XMLDesc(guests.XML_MIGRATABLE))
            if guests.power_state(dom) == guests.PAUSED and not self._post_copy(dom):
                dom.resume()   # paused by force-complete to converge
            if os.path.isdir(store.instance_dir(uuid)):
                store.write_file(store.domain_xml_file(uuid),
                                 dom.XMLDesc(guests.XML_INACTIVE))
        store.plug(uuid, network_info, ())
        return guests.power_state(dom)

    def cleanup(self, host, instance, destroy_disks):
        uuid = instance["uuid"]
        if guests.find(self._conn(host), uuid) is not None:
            LOG.warning("not cleaning up %s on %s: the guest is still defined there",
                        uuid, host)
            return
        storage = self._storage(host)
        storage.forget(uuid)
        if destroy_disks:
            storage.drop_instance_dir(uuid)

    # -- lifecycle ---------------------------------------------------------------------------
    def spawn(self, host, instance, network_info, block_device_info):
        uuid = instance["uuid"]
        conn, storage = self._conn(host), self._storage(host)
        storage.ensure_instance_dir(uuid, (instance.get("disk_gb") or 0) * GIB)
        with libvirt_errors(f"creating guest {uuid} on {host}"):
            dom = guests.find(conn, uuid)
            if dom is None:
                xml = guests.domain_xml(self.settings, guests.domain_type_of(conn, self.settings),
                                        instance, storage)
                storage.write_file(storage.domain_xml_file(uuid), xml)
                dom = conn.defineXML(xml)
            storage.plug(uuid, network_info, block_device_info)
            guests.start(dom)

    def destroy(self, host, instance, destroy_disks=True):
        uuid = instance["uuid"]
        dom = guests.find(self._conn(host), uuid)
        if dom is not None:
            with libvirt_errors(f"destroying guest {uuid} on {host}"):
                guests.remove(dom)
        storage = self._storage(host)
        storage.forget(uuid)
        if destroy_disks:
            storage.drop_instance_dir(uuid)


def _storage_errors(method):
    """Instance-storage failures (disk full, permissions) are DriverErrors."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            raise exceptions.DriverError(
                f"{method.__name__}: instance storage: {err}") from err
    return call


for _name in sorted(base.ComputeDriver.__abstractmethods__):
    setattr(LibvirtDriver, _name, _storage_errors(getattr(LibvirtDriver, _name)))
