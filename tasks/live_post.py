"""Live migration, phase 4: the guest runs on the destination.

Nothing here moves the guest back.  Each step retries with backoff; a step
that still fails is recorded on the migration (failed_step, error) and the
flow goes on, so the last step marks the migration ``error`` instead of a
rollback.  The state database learns first that the instance moved.
"""
import inspect
import logging

import tenacity

from migrateflow import lifecycle
from migrateflow.conf import CONF
from migrateflow.states import LiveMigrationStatus as Status
from migrateflow.states import PowerState
from migrateflow.tasks import base


class PostStep(base.MigrationTask):
    """A step after the point of no return: retried, never raises.

    Reverts by: nothing (a finished move is never rolled back).
    """

    def __init__(self, **kwargs):
        # execute() takes **kwargs, so the store values run() needs are
        # declared from run()'s own signature
        needs = [p for p in inspect.signature(self.run).parameters if p != "migration_id"]
        super().__init__(requires=needs, **kwargs)

    def execute(self, migration_id, **kwargs):
        opts = CONF.migration
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(opts.post_migration_attempts),
            wait=tenacity.wait_exponential(multiplier=opts.post_migration_retry_interval,
                                           max=60) if opts.post_migration_retry_interval
            else tenacity.wait_none(),
            before_sleep=lambda state: self.log(
                logging.WARNING, f"retrying after: {state.outcome.exception()}",
                migration_id, attempt=state.attempt_number),
            sleep=lifecycle.sleep, reraise=True)
        try:
            return retrying(self.run, migration_id=migration_id, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded, the flow goes on
            reason = f"{self.NAME}: {err}"
            self.log(logging.ERROR, f"step failed after retries: {err}", migration_id)
            mig = self.db.get_migration(migration_id)
            if not mig["failed_step"]:
                self.db.update_migration(migration_id, failed_step=self.NAME, error=reason)
            return {"failed": reason}

    def run(self, migration_id, **kwargs):
        raise NotImplementedError

    def revert(self, result, **kwargs):
        return None


class RecordInstanceOnDestination(PostStep):
    """instance.host := destination; the destination claim becomes the
    instance's usage there and the source's usage is released."""

    NAME = "record-instance-on-destination"

    def run(self, migration_id, instance_id, source_host, dest_host):
        self.db.move_instance(migration_id, instance_id, source_host, dest_host,
                              power_state=PowerState.RUNNING)


class ActivateDestinationPorts(PostStep):
    """Port binding host := destination (ACTIVE); the source binding goes."""

    NAME = "activate-destination-ports"

    def run(self, migration_id, instance_id, dest_host):
        ports = self.db.list_ports(instance_id)
        self.db.activate_port_bindings([p["id"] for p in ports], dest_host)


class PostLiveMigrationAtSource(PostStep):
    """Source hypervisor: disconnect volumes, unplug VIFs, drop leftovers."""

    NAME = "post-live-migration-at-source"

    def run(self, migration_id, instance_id, source_host, block_device_info, network_info):
        self.driver.post_live_migration_at_source(
            source_host, self.instance(instance_id), block_device_info, network_info)


class TerminateSourceVolumeConnections(PostStep):
    """Volume service: the source host's connections are terminated."""

    NAME = "terminate-source-volume-connections"

    def run(self, migration_id, instance_id, source_host, block_device_info):
        self.db.delete_volume_connections([b["volume_id"] for b in block_device_info],
                                          source_host)


class PostLiveMigrationAtDestination(PostStep):
    """Destination hypervisor: the guest is persistent and running there."""

    NAME = "post-live-migration-at-destination"

    def run(self, migration_id, instance_id, dest_host, network_info, migrate_data):
        power = self.driver.post_live_migration_at_destination(
            dest_host, self.instance(instance_id), network_info,
            migrate_data["block_migration"])
        self.db.update_instance(instance_id, power_state=power or PowerState.RUNNING)


class CleanupSource(PostStep):
    """Source files and disks are released (kept when storage is shared)."""

    NAME = "cleanup-source"

    def run(self, migration_id, instance_id, source_host, migrate_data):
        self.driver.cleanup(source_host, self.instance(instance_id),
                            destroy_disks=not migrate_data["is_shared_instance_path"])


class CompleteLiveMigration(base.MigrationTask):
    """completed, or error naming the post step that failed; the instance
    is released (task_state None) on the destination either way.

    Reverts by: nothing (after the move).
    """

    NAME = "complete-live-migration"

    def execute(self, migration_id, instance_id):
        mig = self.db.get_migration(migration_id)
        status = Status.ERROR if mig["failed_step"] else Status.COMPLETED
        self.db.finish_migration(migration_id, instance_id, status,
                                 expected_statuses=[Status.RUNNING], current_step=None)
        self.log(logging.INFO, "live migration finished", migration_id, status=status)
        return status
