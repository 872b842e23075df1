"""Confirm or revert a finished resize / cold migration (their own flows).

Confirm: the source's old guest is destroyed and its resources and the
quota reservation released.  Revert: the destination's guest is destroyed
and the source's guest restarted with the old flavor.  The API moves the
migration to confirming / reverting (compare-and-swap on ``finished``)
before the flow runs.
"""
import logging

from migrateflow import exceptions as exc
from migrateflow import scheduler
from migrateflow.states import MoveStatus, PowerState, VmState
from migrateflow.tasks import base
from migrateflow.tasks.resize_checks import block_device_info, network_info


class StartConfirmResize(base.MigrationTask):
    """confirming.

    Reverts by: the migration goes back to ``finished`` with the reason (the
    confirm can be asked again; the instance stays RESIZED on the
    destination); a confirm that already destroyed the source guest simply
    finds nothing to destroy the next time.
    """

    NAME = "start-confirm-resize"

    def execute(self, migration_id):
        mig = self.db.get_migration(migration_id)
        if mig["status"] != MoveStatus.CONFIRMING:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is {mig['status']}, not confirming")

    def revert(self, result, migration_id, flow_failures=None, **kwargs):
        reason = base.failure_reason(flow_failures)
        self.db.update_migration(migration_id, expected_statuses=[MoveStatus.CONFIRMING],
                                 status=MoveStatus.FINISHED, current_step=None,
                                 error=f"confirm failed: {reason}")
        self.log(logging.WARNING, "confirm failed; the resize stays finished",
                 migration_id, reason=repr(reason))


class ConfirmMigrationAtSource(base.MigrationTask):
    """On the source: the old guest is destroyed and undefined, its disk
    removed unless the storage is shared with the destination.

    Reverts by: nothing (a destroyed guest cannot come back; the resized
    guest on the destination is untouched).
    """

    NAME = "confirm-migration-at-source"

    def execute(self, migration_id, instance_id, source_host, dest_host, shared_storage):
        self.driver.confirm_migration(source_host, self.instance(instance_id),
                                      shared_storage, dest=dest_host)


class CompleteConfirmResize(base.MigrationTask):
    """confirmed: the source's old-flavor usage and the quota reservation
    are released, the instance active (or stopped); one transaction.

    Reverts by: nothing (the last step).
    """

    NAME = "complete-confirm-resize"

    def execute(self, migration_id, instance_id):
        power = self.db.get_instance(instance_id)["power_state"]
        self.db.confirm_resize_records(migration_id, power)
        self.log(logging.INFO, "resize confirmed", migration_id)


class StartRevertResize(base.MigrationTask):
    """reverting (task_state resize_reverting).

    Reverts by: back to ``finished`` (task_state None) when the hypervisors
    were not touched yet; once finish-revert-migration has run the state of
    the guests is uncertain, so the migration becomes ``error`` and the
    instance ERROR for the operator (never a confirm that could destroy the
    last copy).
    """

    NAME = "start-revert-resize"

    def execute(self, migration_id):
        mig = self.db.get_migration(migration_id)
        if mig["status"] != MoveStatus.REVERTING:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is {mig['status']}, not reverting")

    def revert(self, result, migration_id, instance_id, flow_failures=None, **kwargs):
        reason = base.failure_reason(flow_failures)
        touched = {FinishRevertMigration.NAME, CompleteRevertResize.NAME}
        if touched & set(flow_failures or {}):
            self.db.abandon_resize(migration_id, instance_id, MoveStatus.ERROR,
                                   expected_statuses=[MoveStatus.REVERTING],
                                   error=f"revert failed: {reason}",
                                   instance_values={"vm_state": VmState.ERROR})
            self.log(logging.ERROR, "revert failed on the hypervisors", migration_id,
                     reason=repr(reason))
            return
        self.db.update_migration(migration_id, expected_statuses=[MoveStatus.REVERTING],
                                 status=MoveStatus.FINISHED, current_step=None,
                                 error=f"revert failed: {reason}")
        self.db.update_instance(instance_id, task_state=None)
        self.log(logging.WARNING, "revert failed; the resize stays finished", migration_id,
                 reason=repr(reason))


class CheckRevertResize(base.MigrationTask):
    """The source is up and still has the old guest; the destination
    hypervisor can be reached.

    Reverts by: nothing (read-only).
    """

    NAME = "check-revert-resize"

    def execute(self, migration_id, instance_id, source_host, dest_host):
        scheduler.check_host_usable(self.db.get_host(source_host), "source")
        if self.driver.get_guest(source_host, instance_id) is None:
            raise exc.InstanceInvalidState(
                f"host {source_host} no longer has the guest of instance {instance_id}: "
                "nothing to revert to")
        self.driver.get_host_info(dest_host)


class RevertPortsToSource(base.MigrationTask):
    """Network service: every port's binding moves back to the source.

    Reverts by: the binding moves to the destination again.
    """

    NAME = "revert-ports-to-source"

    def execute(self, migration_id, instance_id, source_host):
        ports = [p["id"] for p in self.db.list_ports(instance_id)]
        self.db.add_port_bindings(ports, source_host, "INACTIVE", migration_uuid=migration_id)
        self.db.activate_port_bindings(ports, source_host)

    def revert(self, result, migration_id, instance_id, dest_host, **kwargs):
        ports = [p["id"] for p in self.db.list_ports(instance_id)]
        self.db.add_port_bindings(ports, dest_host, "INACTIVE")
        self.db.activate_port_bindings(ports, dest_host)


class RevertVolumesToSource(base.MigrationTask):
    """Volume service: the volumes are exported to the source again and the
    destination's connections terminated.

    Reverts by: the connections move to the destination again.
    """

    NAME = "revert-volumes-to-source"

    def execute(self, migration_id, instance_id, source_host, dest_host):
        self._move(instance_id, dest_host, source_host)

    def revert(self, result, migration_id, instance_id, source_host, dest_host, **kwargs):
        self._move(instance_id, source_host, dest_host)

    def _move(self, instance_id, from_host, to_host):
        volumes = [b["volume_id"] for b in self.db.list_block_devices(instance_id)]
        self.db.add_volume_connections(instance_id, volumes, to_host)
        if from_host != to_host:
            self.db.delete_volume_connections(volumes, from_host)


class FinishRevertMigration(base.MigrationTask):
    """On the hypervisors: the destination guest is destroyed (its disk copy
    removed unless shared) and the source guest gets the old flavor, its
    volumes and VIFs back, and is started when it was running.

    Reverts by: nothing here; the start step's revert marks the migration
    error (the guests' state after a failure here is for the operator).
    """

    NAME = "finish-revert-migration"
    default_provides = "power_state"

    def execute(self, migration_id, instance_id, source_host, dest_host, old_flavor,
                power_on):
        power = self.driver.finish_revert_migration(
            dest_host, source_host, self.instance(instance_id), old_flavor,
            network_info(self.db, instance_id), block_device_info(self.db, instance_id),
            power_on)
        return power or (PowerState.RUNNING if power_on else PowerState.SHUTDOWN)


class CompleteRevertResize(base.MigrationTask):
    """reverted: the instance is back on the source with the old flavor,
    the destination's usage and the quota reservation released; one
    transaction.

    Reverts by: nothing (the last step).
    """

    NAME = "complete-revert-resize"

    def execute(self, migration_id, power_state):
        self.db.revert_resize_records(migration_id, power_state)
        self.log(logging.INFO, "resize reverted", migration_id)
