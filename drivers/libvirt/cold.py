"""The libvirt driver's power, cold migration / resize and evacuation
methods (a mixin of LibvirtDriver).

A cold migration copies the stopped guest's instance directory (its disk,
grown to the new flavor, and its domain definition with the paths of the
destination) into the destination's instances path, then defines the
guest there from that definition with the new flavor's memory and vcpus.
The source keeps its (stopped) guest until confirm or revert.
"""
import logging
import os

from migrateflow import exceptions
from migrateflow.drivers.libvirt import files, guests, hostinfo, storage as storage_mod
from migrateflow.drivers.libvirt.connection import libvirt_errors

LOG = logging.getLogger(__name__)
GIB = storage_mod.GIB


def _flavor_fields(flavor):
    return {"memory_mb": int(flavor["memory_mb"]), "vcpus": int(flavor["vcpus"]),
            "disk_gb": int(flavor.get("disk_gb") or 0)}


class ColdMigration:
    """Needs the driver's ``settings``, ``_conn``, ``_storage``, ``_guest``."""

    # -- power -------------------------------------------------------------------
    def power_off(self, host, instance):
        dom = self._guest(host, instance["uuid"])
        with libvirt_errors(f"powering off guest {instance['uuid']} on {host}"):
            guests.stop(dom, self.settings.shutdown_timeout)

    def power_on(self, host, instance):
        dom = self._guest(host, instance["uuid"])
        with libvirt_errors(f"starting guest {instance['uuid']} on {host}"):
            guests.start(dom)

    # -- cold migration / resize -------------------------------------------------------
    def check_instance_shared_storage(self, source, dest, instance):
        self._conn(source)
        self._conn(dest)
        src, dst = self._storage(source), self._storage(dest)
        probe = dst.probe(instance["uuid"], "shared-storage")
        dst.touch_probe(probe)
        try:
            return src.sees(probe)
        finally:
            dst.remove_probe(probe)

    def _check_shrink(self, instance, store, flavor):
        """Disks cannot shrink (volume-backed guests have no local disk)."""
        current = store.disk_gb(instance["uuid"]) or instance.get("disk_gb") or 0
        new_disk = flavor.get("disk_gb") or 0
        if not instance.get("volume_backed") and new_disk < current:
            raise exceptions.MigrationPreCheckError(
                f"cannot resize instance {instance['uuid']} to flavor "
                f"{flavor.get('name')!r}: disks cannot shrink ({new_disk} GB < current "
                f"{current} GB)")

    def migrate_disk_and_power_off(self, source, instance, dest, flavor, network_info,
                                   block_device_info, shared_storage):
        uuid, new_disk = instance["uuid"], flavor.get("disk_gb") or 0
        if source == dest:
            return self._resize_in_place(source, instance, flavor)
        dst_conn = self._conn(dest)
        src, dst = self._storage(source), self._storage(dest)
        dom = self._guest(source, uuid)
        self._check_shrink(instance, src, flavor)
        copy_missing = not shared_storage and not os.path.isdir(dst.instance_dir(uuid))
        if copy_missing:
            free = hostinfo.disk_gb(dst_conn, self.settings, dst)[1]
            if free < new_disk:
                raise exceptions.InsufficientResources(
                    f"host {dest} has {free} GB free, instance {uuid} needs {new_disk} GB "
                    f"for its disk")
        with libvirt_errors(f"powering off guest {uuid} on {source}"):
            guests.stop(dom, self.settings.shutdown_timeout)
            xml = guests.moved(dom.XMLDesc(guests.XML_INACTIVE), src.instance_dir(uuid),
                               dst.instance_dir(uuid))
        if copy_missing:
            dst.ensure_root()
            files.copy_instance(src.instance_dir(uuid), dst.instance_dir(uuid),
                                xml, new_disk * GIB)
        elif shared_storage:
            dst.write_file(dst.domain_xml_file(uuid), xml)
        src.unplug(uuid)
        dst.hold(uuid, from_host=source)
        return {"disk_info": [{"path": dst.instance_dir(uuid), "disk_gb": new_disk,
                               "copied": not shared_storage}]}

    def _resize_in_place(self, host, instance, flavor):
        """Same-host resize: the old directory is kept beside the resized
        one until confirm (dropped) or revert (restored)."""
        uuid, new_disk = instance["uuid"], flavor.get("disk_gb") or 0
        store = self._storage(host)
        dom = self._guest(host, uuid)
        self._check_shrink(instance, store, flavor)
        with libvirt_errors(f"powering off guest {uuid} on {host}"):
            guests.stop(dom, self.settings.shutdown_timeout)
        if not os.path.isdir(store.backup_dir(uuid)):
            files.copy_instance(store.instance_dir(uuid), store.backup_dir(uuid))
        store.grow_disk(uuid, new_disk)
        store.unplug(uuid)
        return {"disk_info": [{"path": store.instance_dir(uuid), "disk_gb": new_disk,
                               "copied": False}]}

    def _redefine(self, conn, dom, flavor):
        """Give the defined guest ``flavor`` (stopped first if it runs)."""
        if guests.flavor(dom) == _flavor_fields(flavor):
            return dom
        guests.stop(dom, self.settings.shutdown_timeout)
        return conn.defineXML(guests.with_flavor(dom.XMLDesc(guests.XML_INACTIVE), flavor))

    def finish_migration(self, dest, instance, flavor, network_info, block_device_info,
                         power_on):
        uuid = instance["uuid"]
        conn, store = self._conn(dest), self._storage(dest)
        if not store.has_disk(uuid):
            raise exceptions.DriverError(
                f"the disk of instance {uuid} is not on the storage of {dest}")
        with libvirt_errors(f"creating guest {uuid} on {dest}"):
            dom = guests.find(conn, uuid)
            if dom is None:
                xml = store.read_domain_xml(uuid) or guests.domain_xml(
                    self.settings, guests.domain_type_of(conn, self.settings), instance, store)
                dom = conn.defineXML(guests.with_flavor(xml, flavor))
            else:
                dom = self._redefine(conn, dom, flavor)
            store.plug(uuid, network_info, block_device_info)
            if power_on:
                guests.start(dom)
            else:
                guests.stop(dom, self.settings.shutdown_timeout)
            return guests.power_state(dom)

    def confirm_migration(self, source, instance, shared_storage, dest=None):
        uuid = instance["uuid"]
        conn, store = self._conn(source), self._storage(source)
        if dest == source:
            store.remove(store.backup_dir(uuid))   # the guest is the resized one
            return
        dom = guests.find(conn, uuid)
        if dom is not None and guests.power_state(dom) == guests.RUNNING:
            raise exceptions.DriverError(
                f"guest {uuid} runs on {source}; not confirming its migration away")
        self._remove(dom, store, uuid, source, shared_storage)

    @staticmethod
    def _remove(dom, store, uuid, host, shared_storage):
        """The guest gone from ``host``: its domain, its record there, and
        its instance directory unless the storage is shared."""
        if dom is not None:
            with libvirt_errors(f"removing guest {uuid} from {host}"):
                guests.remove(dom)
        store.forget(uuid)
        if not shared_storage:
            store.drop_instance_dir(uuid)

    def finish_revert_migration(self, dest, source, instance, old_flavor, network_info,
                                block_device_info, power_on):
        uuid = instance["uuid"]
        dst_conn, src_conn = self._conn(dest), self._conn(source)
        src, dst = self._storage(source), self._storage(dest)
        src_dom = guests.find(src_conn, uuid)
        if src_dom is None:
            raise exceptions.DriverError(
                f"no guest {uuid} left on {source} to revert to (confirmed?)")
        with libvirt_errors(f"reverting the migration of {uuid} to {source}"):
            if source == dest:
                if os.path.isdir(src.backup_dir(uuid)):
                    guests.stop(src_dom, self.settings.shutdown_timeout)
                src.restore_backup(uuid)
            else:
                dst_dom = guests.find(dst_conn, uuid)
                if dst_dom is not None:
                    guests.remove(dst_dom)
                dst.forget(uuid)
                if not dst.shares_with(src):
                    dst.drop_instance_dir(uuid)
            src_dom = self._redefine(src_conn, src_dom, old_flavor)
            src.plug(uuid, network_info, block_device_info)
            if power_on:
                guests.start(src_dom)
            return guests.power_state(src_dom)

    def cleanup_migration_destination(self, dest, instance, shared_storage):
        uuid = instance["uuid"]
        conn, store = self._conn(dest), self._storage(dest)
        source = (store.record(uuid) or {}).get("from_host")
        if not source or source == dest or guests.find(self._conn(source), uuid) is None:
            LOG.warning("not cleaning up %s on %s: no other host defines it", uuid, dest)
            return
        self._remove(guests.find(conn, uuid), store, uuid, dest, shared_storage)

    # -- evacuation --------------------------------------------------------------------
    def instance_on_disk(self, host, instance):
        self._conn(host)
        return self._storage(host).has_disk(instance["uuid"])

    def rebuild(self, host, instance, image_ref, network_info, block_device_info,
                on_shared_storage, power_on):
        uuid = instance["uuid"]
        conn, store = self._conn(host), self._storage(host)
        if on_shared_storage:
            if not store.has_disk(uuid):
                raise exceptions.DriverError(
                    f"the disk of instance {uuid} is not on the storage of {host}: "
                    "it is not on shared storage")
        else:
            # a fresh, empty disk: fetching image_ref is not done by this driver yet
            store.ensure_instance_dir(uuid, (instance.get("disk_gb") or 0) * GIB)
        with libvirt_errors(f"rebuilding guest {uuid} on {host}"):
            dom = guests.find(conn, uuid)
            if dom is None:
                xml = guests.domain_xml(self.settings, guests.domain_type_of(
                    conn, self.settings), instance, store)
                store.write_file(store.domain_xml_file(uuid), xml)
                dom = conn.defineXML(xml)
            store.plug(uuid, network_info, block_device_info)
            if power_on:
                guests.start(dom)
            return guests.power_state(dom)
