"""Cold migration / resize, phase 1: accept, check the instance, choose the
destination (up to three alternates), claim the new flavor there and find
out whether source and destination share the instance path.  Nothing here
touches the guest."""
import logging

from migrateflow import exceptions as exc
from migrateflow import scheduler
from migrateflow.states import MoveStatus, PowerState, VmState
from migrateflow.tasks import base

#: statuses a resize flow can be in before it finishes
RESIZE_IN_FLIGHT = (MoveStatus.PRE_MIGRATING, MoveStatus.MIGRATING, MoveStatus.POST_MIGRATING)


def network_info(db, instance_id):
    return [{"port_id": p["id"], "mac": p["mac"], "network_id": p["network_id"]}
            for p in db.list_ports(instance_id)]


def block_device_info(db, instance_id):
    return [{"volume_id": b["volume_id"], "device": b["device_name"]}
            for b in db.list_block_devices(instance_id)]


def sized(instance, flavor):
    """The instance (driver dict or DB row) as it is with ``flavor``."""
    return dict(instance, memory_mb=flavor["memory_mb"], vcpus=flavor["vcpus"],
                disk_gb=flavor["disk_gb"])


class StartResize(base.MigrationTask):
    """The migration was accepted as pre-migrating (task_state resize_prep).
    Its revert is the last step of every rollback.

    Reverts by: marking the migration ``error`` with the reason, releasing
    the instance (task_state None) on the source with its old flavor and
    power state, and dropping the quota reservation (one transaction).
    """

    NAME = "start-resize"

    def execute(self, migration_id, instance_id):
        mig = self.db.get_migration(migration_id)
        if mig["status"] not in RESIZE_IN_FLIGHT:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is {mig['status']}, not pre-migrating")

    def revert(self, result, migration_id, instance_id, power_on, flow_failures=None,
               **kwargs):
        reason = base.failure_reason(flow_failures)
        self.db.abandon_resize(
            migration_id, instance_id, MoveStatus.ERROR, expected_statuses=RESIZE_IN_FLIGHT,
            error=reason, instance_values={
                "power_state": PowerState.RUNNING if power_on else PowerState.SHUTDOWN})
        self.log(logging.INFO, "resize rolled back", migration_id, reason=repr(reason))


class CheckInstanceForResize(base.MigrationTask):
    """The instance is active or stopped on a source host that is up, and
    the hypervisor agrees.

    Reverts by: nothing (read-only).
    """

    NAME = "check-instance-for-resize"

    def execute(self, migration_id, instance_id, source_host, power_on):
        inst = self.db.get_instance(instance_id)
        if inst["host"] != source_host:
            raise exc.InstanceInvalidState(
                f"instance {instance_id} is on {inst['host']}, not {source_host}")
        if inst["vm_state"] not in (VmState.ACTIVE, VmState.STOPPED):
            raise exc.InstanceInvalidState(
                f"instance {instance_id} is {inst['vm_state']}: only an active or "
                "stopped instance can be resized or migrated")
        scheduler.check_host_usable(self.db.get_host(source_host), "source")
        guest = self.driver.get_guest(source_host, instance_id)
        if guest is None:
            raise exc.InstanceInvalidState(
                f"hypervisor on {source_host} has no guest for instance {instance_id}")


class CheckResizeCandidate(base.MigrationTask):
    """The candidate can take the instance with its new flavor; it becomes
    dest_host.  The source itself is a candidate only when the request was
    accepted with allow_resize_to_same_host.  ``None`` ends the list:
    NoValidHost with the reason every tried host was refused.

    Reverts by: recording why the candidate was refused (scheduler notes).
    """

    NAME = "check-resize-candidate"

    def execute(self, migration_id, instance_id, source_host, candidate, new_flavor):
        if candidate is None:
            notes = self.db.get_migration(migration_id)["scheduler_notes"]
            detail = "; ".join(f"{h}: {r}" for h, r in notes.items()) or "no candidates"
            raise exc.NoValidHost(f"no valid host for instance {instance_id}: {detail}")
        scheduler.validate_host_name(candidate)
        inst = sized(self.db.get_instance(instance_id), new_flavor)
        dest = self.db.get_host(candidate)
        if candidate == source_host:
            scheduler.check_host_usable(dest, "destination")
        else:
            scheduler.check_destination(inst, self.db.get_host(source_host), dest)
        self.db.update_migration(migration_id, dest_host=candidate)
        return candidate

    def revert(self, result, migration_id, candidate, flow_failures=None, **kwargs):
        if candidate is None:
            return
        self.db.add_scheduler_note(migration_id, candidate,
                                   base.failure_reason(flow_failures))


class ClaimResizeResources(base.MigrationTask):
    """Hold the new flavor's memory, vCPUs and disk on the destination
    (Nova's prep_resize claim).

    Reverts by: dropping this migration's claim on the destination.
    """

    NAME = "claim-resize-resources"

    def execute(self, migration_id, instance_id, dest_host, new_flavor):
        inst = sized(self.db.get_instance(instance_id), new_flavor)
        self.db.claim_resources(migration_id, inst, dest_host)

    def revert(self, result, migration_id, dest_host, **kwargs):
        # also on failure: the step may have died after the claim was made
        self.db.drop_claim(migration_id, dest_host)


class CheckSharedStorage(base.MigrationTask):
    """Do source and destination share the instance path?  A test file is
    written on the destination and looked for from the source (one driver
    call that leaves nothing behind); one host always shares with itself.

    Reverts by: nothing (leaves nothing behind).
    """

    NAME = "check-shared-storage"
    default_provides = "shared_storage"

    def execute(self, instance_id, source_host, dest_host):
        if source_host == dest_host:
            return True
        return bool(self.driver.check_instance_shared_storage(
            source_host, dest_host, self.instance(instance_id)))
