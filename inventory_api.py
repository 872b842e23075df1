"""Hosts, queries, flavors and quotas: the part of ``MigrationAPI`` that
moves nothing by itself (a mixin; it uses the API's ``db``, ``conf`` and
``_caller``).  Every call is authorized for the API's caller first."""
import logging

from taskflow import exceptions as tf_exc

from migrateflow import engine, policy, scheduler
from migrateflow import exceptions as exc

LOG = logging.getLogger(__name__)


class InventoryOps:
    """set_host_state, drain_host, flow_steps, list/show migrations, sweep,
    list hosts and instances, flavors, quotas."""

    # -- hosts ------------------------------------------------------------------
    def set_host_state(self, host, **values):
        """Mark a host up/down, forced down (fenced) or (dis)abled for
        scheduling: ``up``, ``forced_down``, ``disabled``, ``disabled_reason``."""
        with self._caller(policy.HOST_UPDATE):
            return self._set_host_state(host, values)

    def _set_host_state(self, host, values):
        scheduler.validate_host_name(host)
        unknown = set(values) - {"up", "forced_down", "disabled", "disabled_reason"}
        if unknown:
            raise exc.InvalidRequest(f"unknown host fields: {', '.join(sorted(unknown))}")
        self.db.get_host(host)
        self.db.update_host(host, **values)
        LOG.info("host state changed host=%s %s", host,
                 " ".join(f"{k}={v}" for k, v in sorted(values.items())))
        return self.db.get_host(host)

    def drain_host(self, host, **kwargs):
        """Disable ``host`` and live-migrate every instance off it (see
        ``hostops.drain_host``)."""
        from migrateflow import hostops  # hostops drives this API
        with self._caller(policy.HOST_DRAIN) as ctx:
            return hostops.drain_host(self.for_caller(ctx), host, **kwargs)

    # -- queries --------------------------------------------------------------
    def flow_steps(self, migration_id):
        """[(step name, TaskFlow state)] of the migration's persisted flow,
        in the order the flow runs them; [] when nothing was persisted."""
        with self._caller(policy.SHOW_MIGRATION, self._migration_project(migration_id)):
            mig = self.db.get_migration(migration_id)
        if not mig["flow_uuid"]:
            return []
        try:
            return engine.flow_atoms(mig["flow_uuid"])
        except tf_exc.NotFound:
            return []

    def list_migrations(self, instance_id=None, status=None):
        with self._caller(policy.LIST_MIGRATIONS):
            return self.db.list_migrations(instance_uuid=instance_id, status=status)

    def stuck_migrations(self):
        """Transitional migrations nobody moves (``sweeper.find_stuck``)."""
        from migrateflow import sweeper
        with self._caller(policy.LIST_MIGRATIONS):
            return sweeper.find_stuck()

    def sweep(self):
        """Resume or settle every stuck migration now (``sweeper.sweep``)."""
        from migrateflow import sweeper
        with self._caller(policy.RESUME):
            return sweeper.sweep()

    def show_migration(self, migration_id):
        with self._caller(policy.SHOW_MIGRATION, self._migration_project(migration_id)):
            return self.db.get_migration(migration_id)

    def list_hosts(self):
        with self._caller(policy.HOST_LIST):
            return self.db.list_hosts()

    def list_instances(self, host=None):
        with self._caller(policy.INSTANCE_LIST):
            return self.db.list_instances(host=host)

    # -- flavors and quotas -------------------------------------------------------
    def create_flavor(self, name, *, memory_mb, vcpus, disk_gb):
        with self._caller(policy.FLAVOR_CREATE):
            return self.db.create_flavor(name, memory_mb=memory_mb, vcpus=vcpus,
                                         disk_gb=disk_gb)

    def list_flavors(self):
        return self.db.list_flavors()

    def set_quota(self, project_id, resource, hard_limit):
        with self._caller(policy.QUOTA_UPDATE):
            return self.db.set_quota(project_id, resource, hard_limit)
