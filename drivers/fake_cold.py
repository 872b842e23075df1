"""The fake driver's cold migration / resize methods (Nova's
migrate_disk_and_power_off / finish_migration / confirm_migration /
finish_revert_migration), as a mixin of ``FakeDriver``: same shared state,
same fault hook, same side-effect counting."""
import logging

from migrateflow import exceptions
from migrateflow.drivers import fake_model as model

LOG = logging.getLogger(__name__)

RUNNING, PAUSED, SHUTDOWN = model.RUNNING, model.PAUSED, model.SHUTDOWN
_hooked = model.hooked
_probe_path = model.probe_path


class ColdMigration:
    """Needs FakeDriver's ``_tx`` and ``_store``."""

    # -- power -----------------------------------------------------------------------
    @_hooked
    def power_off(self, host, instance):
        self._set_power(host, instance, SHUTDOWN, "power_off")

    @_hooked
    def power_on(self, host, instance):
        self._set_power(host, instance, RUNNING, "power_on")

    def _set_power(self, host, instance, state, method):
        uuid = instance["uuid"]
        with self._tx() as db:
            model.get_host(db, host)
            if model.get_guest(db, host, uuid) is None:
                raise exceptions.DriverError(f"no guest {uuid} on {host}")
            if model.set_guest(db, host, uuid, state=state):
                model.record_change(db, method, host, uuid)

    # -- cold migration / resize --------------------------------------------------------
    @_hooked
    def check_instance_shared_storage(self, source, dest, instance):
        """Write the probe on dest's storage, look from source, remove it:
        one transaction, so nothing is left behind and nothing is counted."""
        probe = _probe_path(instance["uuid"], "shared-storage")
        with self._tx() as db:
            seen_from = model.storage_of(model.get_host(db, source))
            written_to = model.storage_of(model.get_host(db, dest))
            model.ensure_file(db, written_to, probe, instance["uuid"], 0)
            shared = model.file_row(db, seen_from, probe) is not None
            model.delete(db, "files", "location = ? AND path = ?", (written_to, probe))
        return shared

    @_hooked
    def migrate_disk_and_power_off(self, source, instance, dest, flavor, network_info,
                                   block_device_info, shared_storage):
        uuid, path = instance["uuid"], model.instance_dir(instance["uuid"])
        new_disk = flavor.get("disk_gb") or 0
        if source == dest:
            return self._resize_in_place(source, instance, flavor)
        with self._tx() as db:
            model.get_host(db, source)
            dest_row = model.get_host(db, dest)
            _resizable_guest(db, source, instance, flavor)
            where = model.storage_of(dest_row)
            copy_missing = not shared_storage and model.file_row(db, where, path) is None
            free = model.host_info(db, dest_row)["disk_free_gb"]
            if copy_missing and free < new_disk:
                raise exceptions.InsufficientResources(
                    f"host {dest} has {free} GB free, instance {uuid} needs {new_disk} GB "
                    f"for its disk")
            changed = model.set_guest(db, source, uuid, state=SHUTDOWN)
            if copy_missing:
                changed |= model.ensure_file(db, where, path, uuid, new_disk)
            changed |= model.release_host_resources(db, source, uuid)
            if changed:
                model.record_change(db, "migrate_disk_and_power_off", source, uuid)
        return {"disk_info": [{"path": path, "disk_gb": new_disk,
                               "copied": not shared_storage}]}

    def _resize_in_place(self, host, instance, flavor):
        """Same-host resize: the old disk is kept as a backup beside the
        resized one until confirm (dropped) or revert (restored)."""
        uuid, path = instance["uuid"], model.instance_dir(instance["uuid"])
        new_disk = flavor.get("disk_gb") or 0
        with self._tx() as db:
            row = model.get_host(db, host)
            current = _resizable_guest(db, host, instance, flavor)["disk_gb"] or 0
            where = model.storage_of(row)
            changed = model.set_guest(db, host, uuid, state=SHUTDOWN)
            if model.file_row(db, where, _backup_path(uuid)) is None:
                old = model.file_row(db, where, path)
                model.ensure_file(db, where, _backup_path(uuid), uuid,
                                  old["disk_gb"] if old else current)
                db.execute("UPDATE files SET disk_gb = ? WHERE location = ? AND path = ?",
                           (new_disk, where, path))
                changed = True
            changed |= model.release_host_resources(db, host, uuid)
            if changed:
                model.record_change(db, "migrate_disk_and_power_off", host, uuid)
        return {"disk_info": [{"path": path, "disk_gb": new_disk, "copied": False}]}

    @_hooked
    def finish_migration(self, dest, instance, flavor, network_info, block_device_info,
                         power_on):
        uuid = instance["uuid"]
        state = RUNNING if power_on else SHUTDOWN
        columns = model.flavor_columns(flavor)
        with self._tx() as db:
            where = model.storage_of(model.get_host(db, dest))
            if model.file_row(db, where, model.instance_dir(uuid)) is None:
                raise exceptions.DriverError(
                    f"the disk of instance {uuid} is not on the storage of {dest}")
            if model.get_guest(db, dest, uuid) is None:
                rate = db.execute("SELECT MAX(dirty_rate_mbps) FROM guests WHERE uuid = ?",
                                  (uuid,)).fetchone()[0]
                model.define_guest(db, dest, dict(instance, **columns, dirty_rate_mbps=rate),
                                   state, persistent=True)
                changed = True
            else:
                changed = model.set_guest(db, dest, uuid, state=state, persistent=1,
                                          **columns)
            changed |= model.attach_guest(db, dest, uuid, block_device_info, network_info)
            if changed:
                model.record_change(db, "finish_migration", dest, uuid)
        return state

    @_hooked
    def confirm_migration(self, source, instance, shared_storage, dest=None):
        uuid = instance["uuid"]
        with self._tx() as db:
            row = model.get_host(db, source)
            if dest == source:
                # a same-host resize: the guest is the resized one, keep it
                if model.delete(db, "files", "location = ? AND path = ?",
                                (model.storage_of(row), _backup_path(uuid))):
                    model.record_change(db, "confirm_migration", source, uuid)
                return
            guest = model.get_guest(db, source, uuid)
            if guest is not None and guest["state"] == RUNNING:
                raise exceptions.DriverError(
                    f"guest {uuid} runs on {source}; not confirming its migration away")
            if model.clear_guest(db, row, uuid, drop_disk=not shared_storage):
                model.record_change(db, "confirm_migration", source, uuid)

    @_hooked
    def finish_revert_migration(self, dest, source, instance, old_flavor, network_info,
                                block_device_info, power_on):
        uuid = instance["uuid"]
        state = RUNNING if power_on else SHUTDOWN
        with self._tx() as db:
            dest_row = model.get_host(db, dest)
            model.get_host(db, source)
            if model.get_guest(db, source, uuid) is None:
                raise exceptions.DriverError(
                    f"no guest {uuid} left on {source} to revert to (confirmed?)")
            if source == dest:
                changed = _restore_backup(db, dest_row, uuid)
            else:
                # the source guest is defined, so its storage keeps a shared disk
                changed = model.clear_guest(db, dest_row, uuid, drop_disk=True)
            changed |= model.set_guest(db, source, uuid, state=state,
                                       **model.flavor_columns(old_flavor))
            changed |= model.attach_guest(db, source, uuid, block_device_info, network_info)
            if changed:
                model.record_change(db, "finish_revert_migration", dest, uuid)
        return state

    @_hooked
    def cleanup_migration_destination(self, dest, instance, shared_storage):
        uuid = instance["uuid"]
        with self._tx() as db:
            row = model.get_host(db, dest)
            if not model.hosts_defining(db, uuid, other_than=dest):
                LOG.warning("not cleaning up %s on %s: no other host defines it",
                            uuid, dest)
                return
            if model.clear_guest(db, row, uuid, drop_disk=not shared_storage):
                model.record_change(db, "cleanup_migration_destination", dest, uuid)


def _resizable_guest(db, host, instance, flavor):
    """The guest to resize on ``host``; refuses a flavor whose disk is
    smaller than the guest's (disks cannot shrink; volume-backed guests
    have no local disk to shrink)."""
    uuid = instance["uuid"]
    guest = model.get_guest(db, host, uuid)
    if guest is None:
        raise exceptions.DriverError(f"no guest {uuid} on {host}")
    current, new_disk = guest["disk_gb"] or 0, flavor.get("disk_gb") or 0
    if not instance.get("volume_backed") and new_disk < current:
        raise exceptions.MigrationPreCheckError(
            f"cannot resize instance {uuid} to flavor {flavor.get('name')!r}: "
            f"disks cannot shrink ({new_disk} GB < current {current} GB)")
    return guest


def _backup_path(uuid):
    return model.instance_dir(uuid) + "_resize"


def _restore_backup(db, host_row, uuid):
    """Same-host revert: the kept old disk replaces the resized one."""
    where = model.storage_of(host_row)
    backup = model.file_row(db, where, _backup_path(uuid))
    if backup is None:
        return False
    db.execute("UPDATE files SET disk_gb = ? WHERE location = ? AND path = ?",
               (backup["disk_gb"], where, model.instance_dir(uuid)))
    return model.delete(db, "files", "location = ? AND path = ?", (where, _backup_path(uuid)))
