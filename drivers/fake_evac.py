"""The fake driver's evacuation methods (Nova's instance_on_disk and
rebuild on the destination) and the host crash a test or the demo uses to
make a host fail, as a mixin of ``FakeDriver``."""
from migrateflow import exceptions
from migrateflow.drivers import fake_model as model

RUNNING, SHUTDOWN = model.RUNNING, model.SHUTDOWN
_hooked = model.hooked


class Evacuation:
    """Needs FakeDriver's ``_tx``."""

    @_hooked
    def instance_on_disk(self, host, instance):
        with self._tx(write=False) as db:
            where = model.storage_of(model.get_host(db, host))
            return model.file_row(db, where, model.instance_dir(instance["uuid"])) is not None

    @_hooked
    def rebuild(self, host, instance, image_ref, network_info, block_device_info,
                on_shared_storage, power_on):
        uuid = instance["uuid"]
        state = RUNNING if power_on else SHUTDOWN
        with self._tx() as db:
            where = model.storage_of(model.get_host(db, host))
            path = model.instance_dir(uuid)
            if on_shared_storage:
                if model.file_row(db, where, path) is None:
                    raise exceptions.DriverError(
                        f"the disk of instance {uuid} is not on the storage of {host}: "
                        "it is not on shared storage")
                changed = False
            else:  # a fresh disk from the image: what was on the old disk is lost
                changed = model.ensure_file(db, where, path, uuid,
                                            instance.get("disk_gb") or 0)
            if model.get_guest(db, host, uuid) is None:
                model.define_guest(db, host, instance, state, persistent=True)
                changed = True
            else:
                changed |= model.set_guest(db, host, uuid, state=state)
            changed |= model.attach_guest(db, host, uuid, block_device_info, network_info)
            if changed:
                model.record_change(db, "rebuild", host, uuid)
        return state

    # -- test and demo helpers (not part of the contract) -------------------------
    def crash_host(self, name):
        """The host loses power: unreachable, and its guests are no longer
        running (their definitions and disks stay, as on a real host)."""
        with self._tx() as db:
            if not db.execute("UPDATE hosts SET up = 0 WHERE name = ?", (name,)).rowcount:
                raise exceptions.HostNotFound(name)
            db.execute("UPDATE guests SET state = ? WHERE host = ?", (SHUTDOWN, name))
            model.record_event(db, "host.crashed", name, None)
