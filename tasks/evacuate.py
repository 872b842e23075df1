"""Evacuation: rebuild an instance of a dead host on another host.

The source host is down, so nothing here asks it for anything but to
power the guest off (fencing, which is expected to fail when the host is
unreachable).  The destination is chosen by the same candidate steps as a
live migration (``live_checks.CheckCandidateHost`` and
``ClaimDestinationResources``, reused by the flow).  Until the last step
records the instance on the destination every step is undone by the
rollback, which leaves the instance on its source in vm_state error.
"""
import logging

from migrateflow import exceptions as exc
from migrateflow.states import MoveStatus, PowerState, TaskState, VmState
from migrateflow.tasks import base

#: hypervisor states of a guest that still uses its disk
_ALIVE = (PowerState.RUNNING, PowerState.PAUSED)


def _evacuated(db, instance_id, dest_host):
    """The last step already recorded the instance on the destination: from
    then on nothing may be undone."""
    return db.get_instance(instance_id)["host"] == dest_host


class StartEvacuation(base.MigrationTask):
    """accepted → pre-migrating.  Its revert is the last step of every
    rollback.

    Reverts by: marking the evacuation failed with the reason and releasing
    the instance (task_state None) on its source host in vm_state error:
    nothing runs anywhere and the operator may evacuate it again.
    """

    NAME = "start-evacuation"

    def execute(self, migration_id, instance_id):
        self.db.update_migration(migration_id, expected_statuses=[MoveStatus.ACCEPTED],
                                 status=MoveStatus.PRE_MIGRATING)

    def revert(self, result, migration_id, instance_id, flow_failures=None, **kwargs):
        reason = base.failure_reason(flow_failures)
        if self.db.finish_migration(
                migration_id, instance_id, MoveStatus.FAILED,
                expected_statuses=[MoveStatus.ACCEPTED, MoveStatus.PRE_MIGRATING],
                instance_values={"vm_state": VmState.ERROR}, error=reason,
                current_step=None):
            self.log(logging.WARNING, "evacuation rolled back", migration_id,
                     reason=repr(reason))


class CheckSourceDown(base.MigrationTask):
    """The instance (claimed by this evacuation) is still recorded on its
    source host, and that host is down (or came back and already destroyed
    its copy of the instance).

    Reverts by: nothing (read-only).
    """

    NAME = "check-source-down"

    def execute(self, migration_id, instance_id, source_host):
        inst = self.db.get_instance(instance_id)
        if inst["host"] != source_host or inst["task_state"] != TaskState.REBUILDING:
            raise exc.InstanceInvalidState(
                f"instance {instance_id} is on {inst['host']} with task_state "
                f"{inst['task_state']!r}, not being evacuated from {source_host}")
        host = self.db.get_host(source_host)
        if host["up"] and not host["forced_down"] and \
                not self.db.get_migration(migration_id)["source_cleaned"]:
            raise exc.InvalidRequest(
                f"source host {source_host} is up: evacuation needs it down "
                "(forced down or fenced)")


class FenceSource(base.MigrationTask):
    """Make sure the source copy does not run: power it off.  An unreachable
    source host is expected (logged); a source that answers and still runs
    the guest after a failed power-off stops the evacuation (two running
    copies would share the disk and the ports).

    Reverts by: nothing (the source copy stays off: nothing is ever powered
    on on the source by an evacuation).
    """

    NAME = "fence-source"

    def execute(self, migration_id, instance_id, source_host):
        instance = self.instance(instance_id)
        try:
            self.driver.power_off(source_host, instance)
            return
        except exc.DriverError as err:
            self.log(logging.INFO, f"power-off on the source failed (expected when the "
                     f"host is unreachable): {err}", migration_id, source=source_host)
        try:
            guest = self.driver.get_guest(source_host, instance_id)
        except exc.DriverError as err:
            self.log(logging.INFO, f"source hypervisor unreachable: {err}", migration_id,
                     source=source_host)
            return
        if guest is not None and guest["state"] in _ALIVE:
            raise exc.DriverError(
                f"cannot fence instance {instance_id}: its guest is still "
                f"{guest['state']} on {source_host} and could not be powered off")


class CheckDiskOnDestination(base.MigrationTask):
    """instance_on_disk on the candidate destination: is the instance's disk
    on its storage (shared with the dead source)?  Provides
    on_shared_storage.

    Reverts by: nothing (read-only; a failure here tries the next candidate).
    """

    NAME = "check-disk-on-destination"

    def execute(self, instance_id, dest_host):
        return bool(self.driver.instance_on_disk(dest_host, self.instance(instance_id)))


class BindPortsOnDestination(base.MigrationTask):
    """Every port's binding moves to the destination: ACTIVE there, the
    source's binding removed (the source is dead, nothing to hand over).
    Provides network_info.

    Reverts by: binding every port back to the source (ACTIVE) and removing
    the destination's bindings, unless the instance already lives on the
    destination.
    """

    NAME = "bind-ports-on-destination"

    def execute(self, migration_id, instance_id, dest_host):
        ports = self.db.list_ports(instance_id)
        port_ids = [p["id"] for p in ports]
        self.db.add_port_bindings(port_ids, dest_host, "INACTIVE",
                                  migration_uuid=migration_id)
        self.db.activate_port_bindings(port_ids, dest_host)
        return [{"port_id": p["id"], "mac": p["mac"], "network_id": p["network_id"]}
                for p in ports]

    def revert(self, result, migration_id, instance_id, source_host, dest_host, **kwargs):
        # on failure too: the step may have died after moving the bindings
        if _evacuated(self.db, instance_id, dest_host):
            return
        port_ids = [p["id"] for p in self.db.list_ports(instance_id)]
        self.db.add_port_bindings(port_ids, source_host, "INACTIVE")
        self.db.activate_port_bindings(port_ids, source_host)


class ConnectVolumesOnDestination(base.MigrationTask):
    """Every attached volume is connected to the destination host and its
    connection to the dead source terminated.  Provides block_device_info.

    Reverts by: connecting the volumes to the source again and terminating
    the destination's connections, unless the instance already lives on the
    destination.
    """

    NAME = "connect-volumes-on-destination"

    def execute(self, migration_id, instance_id, source_host, dest_host):
        bdms = self.db.list_block_devices(instance_id)
        volume_ids = [b["volume_id"] for b in bdms]
        self.db.add_volume_connections(instance_id, volume_ids, dest_host,
                                       migration_uuid=migration_id)
        self.db.delete_volume_connections(volume_ids, source_host)
        return [{"volume_id": b["volume_id"], "device": b["device_name"]} for b in bdms]

    def revert(self, result, migration_id, instance_id, source_host, dest_host, **kwargs):
        if _evacuated(self.db, instance_id, dest_host):
            return
        volume_ids = [b["volume_id"] for b in self.db.list_block_devices(instance_id)]
        self.db.add_volume_connections(instance_id, volume_ids, source_host)
        self.db.delete_volume_connections(volume_ids, dest_host)


class RebuildOnDestination(base.MigrationTask):
    """rebuild on the destination: the guest is recreated there from its
    disk on shared storage, or from the instance's image; volumes connected,
    VIFs plugged, started when it ran before the host died.

    Reverts by: destroying the destination guest (and its disk unless it is
    the shared one), unless the instance already lives on the destination;
    a driver error is logged and left for the operator.
    """

    NAME = "rebuild-on-destination"

    def execute(self, migration_id, instance_id, dest_host, network_info,
                block_device_info, on_shared_storage, power_on):
        image_ref = self.db.get_instance(instance_id)["image_ref"]
        return self.driver.rebuild(dest_host, self.instance(instance_id), image_ref,
                                   network_info, block_device_info, on_shared_storage,
                                   power_on)

    def revert(self, result, migration_id, instance_id, dest_host, on_shared_storage,
               **kwargs):
        # on failure too: rebuild may have defined the guest before failing
        if _evacuated(self.db, instance_id, dest_host):
            return
        try:
            self.driver.destroy(dest_host, self.instance(instance_id),
                                destroy_disks=not on_shared_storage)
        except exc.DriverError as err:
            self.log(logging.ERROR, f"destroying the rebuilt guest failed, left for the "
                     f"operator: {err}", migration_id, dest=dest_host)


class RecordInstanceEvacuated(base.MigrationTask):
    """finish_evacuation: the instance lives on the destination (claim
    becomes usage, the source's usage released), active and running or
    stopped as before the host died, released (task_state None); the
    evacuation is done, or completed if the source already cleaned up.

    Reverts by: nothing (the last step; its one transaction either moved
    the instance or changed nothing).
    """

    NAME = "record-instance-evacuated"

    def execute(self, migration_id, instance_id, power_on):
        power_state = PowerState.RUNNING if power_on else PowerState.SHUTDOWN
        vm_state = VmState.ACTIVE if power_on else VmState.STOPPED
        self.db.finish_evacuation(migration_id, power_state, vm_state)
        mig = self.db.get_migration(migration_id)
        if mig["source_cleaned"] and mig["status"] == MoveStatus.DONE:
            # the source came back while this step ran: it marked the record
            # cleaned before finish_evacuation could see it
            self.db.mark_source_cleaned(migration_id)
        self.log(logging.INFO, "instance evacuated", migration_id,
                 dest=mig["dest_host"], power=power_state)
