"""Live migration, phase 1: accept, check the instance, choose and check
the destination, check the source.  Nothing here touches the guest."""
import logging

from migrateflow import exceptions as exc
from migrateflow import scheduler
from migrateflow.states import LiveMigrationStatus as Status
from migrateflow.states import PowerState
from migrateflow.tasks import base


class StartLiveMigration(base.MigrationTask):
    """queued → preparing.  Its revert is the last step of every rollback.

    Reverts by: marking the migration failed (or cancelled when the
    operator aborted) with the reason, and releasing the instance
    (task_state None) where it is: on the source, untouched.
    """

    NAME = "start-live-migration"

    def execute(self, migration_id, instance_id):
        self.db.update_migration(migration_id, expected_statuses=[Status.QUEUED],
                                 status=Status.PREPARING)

    def revert(self, result, migration_id, instance_id, flow_failures=None, **kwargs):
        aborted = "migrateflow.exceptions.MigrationAborted" in base.failure_types(flow_failures)
        status = Status.CANCELLED if aborted else Status.FAILED
        reason = base.failure_reason(flow_failures)
        self.db.finish_migration(
            migration_id, instance_id, status,
            expected_statuses=[Status.QUEUED, Status.PREPARING, Status.RUNNING],
            error=reason, current_step=None)
        self.log(logging.INFO, "live migration rolled back", migration_id,
                 status=status, reason=repr(reason))


class CheckInstanceAndSource(base.MigrationTask):
    """The instance is active and running on a source host that is up.

    Reverts by: nothing (read-only).
    """

    NAME = "check-instance-and-source"

    def execute(self, migration_id, instance_id, source_host):
        inst = self.db.get_instance(instance_id)
        if inst["host"] != source_host:
            raise exc.InstanceInvalidState(
                f"instance {instance_id} is on {inst['host']}, not {source_host}")
        scheduler.check_live_migratable(inst)
        scheduler.check_host_usable(self.db.get_host(source_host), "source")
        guest = self.driver.get_guest(source_host, instance_id)
        if guest is None or guest["state"] != PowerState.RUNNING:
            raise exc.InstanceInvalidState(
                f"hypervisor on {source_host} reports instance {instance_id} as "
                f"{guest['state'] if guest else 'absent'}")


class CheckCandidateHost(base.MigrationTask):
    """The candidate passes the destination rules; it becomes dest_host.

    A ``None`` candidate is the end of the list: NoValidHost, with the
    reason every tried host was refused.
    Reverts by: recording why the candidate was refused (scheduler notes).
    """

    NAME = "check-candidate-host"

    def execute(self, migration_id, instance_id, source_host, candidate):
        if candidate is None:
            notes = self.db.get_migration(migration_id)["scheduler_notes"]
            detail = "; ".join(f"{h}: {r}" for h, r in notes.items()) or "no candidates"
            raise exc.NoValidHost(f"no valid host for instance {instance_id}: {detail}")
        scheduler.validate_host_name(candidate)
        inst = self.db.get_instance(instance_id)
        source = self.db.get_host(source_host)
        dest = self.db.get_host(candidate)
        scheduler.check_destination(inst, source, dest)
        self.db.update_migration(migration_id, dest_host=candidate)
        return candidate

    def revert(self, result, migration_id, candidate, flow_failures=None, **kwargs):
        if candidate is None:
            return
        reason = base.failure_reason(flow_failures)
        self.db.add_scheduler_note(migration_id, candidate, reason)


class ClaimDestinationResources(base.MigrationTask):
    """Hold the instance's memory, vCPUs and disk on the destination.

    Reverts by: dropping this migration's claim on the destination, if any.
    """

    NAME = "claim-destination-resources"

    def execute(self, migration_id, instance_id, dest_host):
        self.db.claim_resources(migration_id, self.db.get_instance(instance_id), dest_host)

    def revert(self, result, migration_id, dest_host, **kwargs):
        # also on failure: the step may have died after the claim was made;
        # dropping a claim that does not exist changes nothing
        self.db.drop_claim(migration_id, dest_host)


class CheckDestination(base.MigrationTask):
    """check_can_live_migrate_destination on the destination hypervisor.

    Reverts by: cleanup_live_migration_destination_check (the probe file,
    found by instance when the check failed after making it).
    """

    NAME = "check-can-live-migrate-destination"
    default_provides = "dest_check_data"

    def execute(self, migration_id, instance_id, source_host, dest_host, block_migration):
        source_info = self.driver.get_host_info(source_host)
        return self.driver.check_can_live_migrate_destination(
            dest_host, self.instance(instance_id), source_info, block_migration)

    def revert(self, result, instance_id, dest_host, **kwargs):
        # on failure too: the check may have made the probe before failing
        check_data = None if base.is_failure(result) else result
        try:
            self.driver.cleanup_live_migration_destination_check(
                dest_host, self.instance(instance_id), check_data)
        except exc.DriverError as err:
            self.log(logging.WARNING, f"probe cleanup failed: {err}", dest=dest_host)


class CheckSource(base.MigrationTask):
    """check_can_live_migrate_source: shared storage and block migration;
    the decision is recorded on the migration.

    Reverts by: nothing (the hypervisors are only read; the recorded
    decision stays as the migration's history).
    """

    NAME = "check-can-live-migrate-source"

    def execute(self, migration_id, instance_id, source_host, dest_check_data):
        migrate_data = self.driver.check_can_live_migrate_source(
            source_host, self.instance(instance_id), dest_check_data)
        self.db.update_migration(migration_id,
                                 block_migration=bool(migrate_data["block_migration"]))
        return migrate_data


class CleanupDestinationCheck(base.MigrationTask):
    """Remove the destination check's probe once the source has looked at
    it (Nova does this in the check's ``finally``; a separate step keeps a
    re-run of the source check from deciding without the probe).

    Reverts by: nothing (the destination check's revert cleans up again).
    """

    NAME = "cleanup-destination-check"

    def execute(self, instance_id, dest_host, dest_check_data):
        self.driver.cleanup_live_migration_destination_check(
            dest_host, self.instance(instance_id), dest_check_data)
