"""Cold migration / resize, phases 2 and 3: on the source the guest is
powered off, its disk copied and its volume connections terminated; on the
destination its ports and volumes are set up and the guest is created with
the new flavor.  The source keeps its stopped guest until confirm or
revert, so every step here can roll back to it."""
import logging

from migrateflow import exceptions as exc
from migrateflow.states import MoveStatus, PowerState, TaskState
from migrateflow.tasks import base
from migrateflow.tasks.resize_checks import block_device_info, network_info


def restore_source(task, migration_id, instance_id, source_host, dest_host, old_flavor,
                   power_on):
    """Bring the kept source guest back as it was (old flavor, volumes,
    VIFs, power) and remove what the move left on the destination.  Never
    raises: what cannot be done is logged for the operator."""
    instance = task.instance(instance_id)
    net, bdi = network_info(task.db, instance_id), block_device_info(task.db, instance_id)
    try:
        task.driver.finish_revert_migration(dest_host, source_host, instance, old_flavor,
                                            net, bdi, power_on)
        return
    except exc.DriverError as err:
        task.log(logging.ERROR, f"restoring the source through {dest_host} failed: {err}; "
                 "destination leftovers are for the operator", migration_id)
    if power_on:  # at least run the guest again where it was
        try:
            task.driver.power_on(source_host, instance)
        except exc.DriverError as err:
            task.log(logging.ERROR, f"could not start the guest on {source_host}: {err}",
                     migration_id)


class MigrateDiskAndPowerOff(base.MigrationTask):
    """migrating (task_state resize_migrating): on the source the guest is
    powered off, its disk copied to the destination (unless the storage is
    shared), volumes disconnected from the hypervisor and VIFs unplugged.

    Reverts by: finish_revert_migration (the copy on the destination is
    removed, the source guest gets its old flavor, volumes and VIFs back and
    is started again if it was running); errors are logged, never raised.
    """

    NAME = "migrate-disk-and-power-off"
    default_provides = "disk_info"

    def execute(self, migration_id, instance_id, source_host, dest_host, new_flavor,
                shared_storage):
        self.db.update_migration(migration_id, expected_statuses=[MoveStatus.PRE_MIGRATING],
                                 status=MoveStatus.MIGRATING)
        self.db.update_instance(instance_id, task_state=TaskState.RESIZE_MIGRATING)
        return self.driver.migrate_disk_and_power_off(
            source_host, self.instance(instance_id), dest_host, new_flavor,
            network_info(self.db, instance_id), block_device_info(self.db, instance_id),
            shared_storage)

    def revert(self, result, migration_id, instance_id, source_host, dest_host, old_flavor,
               power_on, **kwargs):
        # also on failure: the copy may have been made before the step died
        restore_source(self, migration_id, instance_id, source_host, dest_host, old_flavor,
                       power_on)


class TerminateSourceVolumeConnections(base.MigrationTask):
    """Volume service: the source host's connections are terminated (the
    hypervisor there was disconnected by the previous step).

    Reverts by: exporting the volumes to the source host again.
    """

    NAME = "terminate-source-volume-connections"

    def execute(self, migration_id, instance_id, source_host, dest_host):
        if source_host == dest_host:
            return
        volumes = [b["volume_id"] for b in self.db.list_block_devices(instance_id)]
        self.db.delete_volume_connections(volumes, source_host)

    def revert(self, result, migration_id, instance_id, source_host, **kwargs):
        volumes = [b["volume_id"] for b in self.db.list_block_devices(instance_id)]
        self.db.add_volume_connections(instance_id, volumes, source_host)


class ConnectDestinationVolumes(base.MigrationTask):
    """post-migrating (task_state resize_migrated): the volumes are exported
    to the destination host.

    Reverts by: terminating the destination's connections (unless the
    destination is the source).
    """

    NAME = "connect-destination-volumes"
    default_provides = "block_device_info"

    def execute(self, migration_id, instance_id, dest_host):
        self.db.update_migration(migration_id, expected_statuses=[MoveStatus.MIGRATING],
                                 status=MoveStatus.POST_MIGRATING)
        self.db.update_instance(instance_id, task_state=TaskState.RESIZE_MIGRATED)
        bdi = block_device_info(self.db, instance_id)
        self.db.add_volume_connections(instance_id, [b["volume_id"] for b in bdi],
                                       dest_host, migration_uuid=migration_id)
        return bdi

    def revert(self, result, migration_id, instance_id, source_host, dest_host, **kwargs):
        if source_host == dest_host:
            return
        volumes = [b["volume_id"] for b in self.db.list_block_devices(instance_id)]
        self.db.delete_volume_connections(volumes, dest_host)


class MigratePortsToDestination(base.MigrationTask):
    """Network service: every port's binding moves to the destination (ACTIVE
    there, the source's dropped), as Nova's migrate_instance_finish.

    Reverts by: the binding moves back to the source.
    """

    NAME = "migrate-ports-to-destination"
    default_provides = "network_info"

    def execute(self, migration_id, instance_id, dest_host):
        ports = [p["id"] for p in self.db.list_ports(instance_id)]
        self.db.add_port_bindings(ports, dest_host, "INACTIVE", migration_uuid=migration_id)
        self.db.activate_port_bindings(ports, dest_host)
        return network_info(self.db, instance_id)

    def revert(self, result, migration_id, instance_id, source_host, **kwargs):
        ports = [p["id"] for p in self.db.list_ports(instance_id)]
        self.db.add_port_bindings(ports, source_host, "INACTIVE")
        self.db.activate_port_bindings(ports, source_host)


class FinishMigration(base.MigrationTask):
    """task_state resize_finish: on the destination the guest is defined
    with the new flavor, volumes connected, VIFs plugged, and started when
    it was running before.  Provides its power state.

    Reverts by: finish_revert_migration, as migrate-disk-and-power-off does
    (the destination guest is destroyed, the source guest restored).
    """

    NAME = "finish-migration"
    default_provides = "power_state"

    def execute(self, migration_id, instance_id, dest_host, new_flavor, network_info,
                block_device_info, power_on):
        self.db.update_instance(instance_id, task_state=TaskState.RESIZE_FINISH)
        power = self.driver.finish_migration(
            dest_host, self.instance(instance_id), new_flavor, network_info,
            block_device_info, power_on)
        return power or (PowerState.RUNNING if power_on else PowerState.SHUTDOWN)

    def revert(self, result, migration_id, instance_id, source_host, dest_host, old_flavor,
               power_on, **kwargs):
        restore_source(self, migration_id, instance_id, source_host, dest_host, old_flavor,
                       power_on)


class FinishResize(base.MigrationTask):
    """finished: the instance is RESIZED on the destination with the new
    flavor (task_state None), the destination claim is its usage there and
    the source keeps the old flavor until confirm or revert; one
    transaction.

    Reverts by: nothing (the last step: nothing after it can fail).
    """

    NAME = "finish-resize"

    def execute(self, migration_id, power_state):
        self.db.finish_resize(migration_id, power_state)
        self.log(logging.INFO, "resize finished: waiting for confirm or revert",
                 migration_id)
