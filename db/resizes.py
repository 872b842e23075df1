"""State database: flavors, project quotas and the records of resizes, cold
migrations and evacuations (mixed into ``StateDB``).

Resources a resize holds, so that a revert always fits:

* while it moves: a claim of the new flavor on the destination, and a quota
  reservation of the growth (new − old, where positive);
* once ``finished`` (instance RESIZED on the destination with the new
  flavor): the source still counts the old flavor (``source_held``) and the
  reservation keeps the old flavor's excess over the new one, so the project
  is charged max(old, new) until confirm or revert;
* confirm releases the source and the reservation; revert releases the
  destination and the reservation, and the instance counts the old flavor.
"""
import sqlalchemy as sa

from migrateflow import exceptions as exc
from migrateflow.db import models as m
from migrateflow.db.common import now as _now, retry as _retry, row as _row
from migrateflow.states import MoveStatus, PowerState, VmState

#: quota resources and the instance column each one counts
QUOTA_RESOURCES = {"cores": "vcpus", "ram_mb": "memory_mb", "instances": None}


def flavor_of(inst):
    """The flavor an instance row (or dict) currently has."""
    return {"name": inst["flavor_name"], "memory_mb": inst["memory_mb"],
            "vcpus": inst["vcpus"], "disk_gb": inst["disk_gb"]}


def _flavor_columns(flavor):
    return {"flavor_name": flavor["name"], "memory_mb": flavor["memory_mb"],
            "vcpus": flavor["vcpus"], "disk_gb": flavor["disk_gb"]}


def _usage_of(flavor, volume_backed):
    """(memory_mb, vcpus, local disk GB) a flavor uses on a host."""
    return (flavor["memory_mb"], flavor["vcpus"],
            0 if volume_backed else flavor["disk_gb"])


def vm_state_for(power_state):
    return VmState.ACTIVE if power_state == PowerState.RUNNING else VmState.STOPPED


class ResizeRecords:
    """Flavors, quotas, resize and evacuation bookkeeping; needs StateDB's
    plumbing (``_writer``, ``_consume``, ``_release``)."""

    # -- flavors ------------------------------------------------------------------
    @_retry
    def create_flavor(self, name, *, memory_mb, vcpus, disk_gb):
        now = _now()
        with self._writer() as conn:
            conn.execute(m.flavors.insert().values(
                name=name, memory_mb=memory_mb, vcpus=vcpus, disk_gb=disk_gb,
                created_at=now, updated_at=now))
        return self.get_flavor(name)

    def get_flavor(self, name):
        flavor = _row(self._fetch_one(m.flavors.select().where(m.flavors.c.name == name)))
        if flavor is None:
            raise exc.FlavorNotFound(name)
        return {k: flavor[k] for k in ("name", "memory_mb", "vcpus", "disk_gb")}

    def list_flavors(self):
        return [{k: f[k] for k in ("name", "memory_mb", "vcpus", "disk_gb")}
                for f in self._fetch_all(m.flavors.select().order_by(m.flavors.c.name))]

    # -- quotas -------------------------------------------------------------------
    @_retry
    def set_quota(self, project_id, resource, hard_limit):
        """Set a project's limit of ``resource`` (cores, ram_mb, instances);
        None removes it (unlimited)."""
        if resource not in QUOTA_RESOURCES:
            raise exc.InvalidRequest(
                f"unknown quota resource {resource!r}: one of {', '.join(QUOTA_RESOURCES)}")
        q = m.quota_limits.c
        now = _now()
        with self._writer() as conn:
            conn.execute(m.quota_limits.delete().where(
                q.project_id == project_id, q.resource == resource))
            if hard_limit is not None:
                conn.execute(m.quota_limits.insert().values(
                    project_id=project_id, resource=resource, hard_limit=hard_limit,
                    created_at=now, updated_at=now))

    def quota_limits(self, project_id):
        q = m.quota_limits.c
        return {r["resource"]: r["hard_limit"] for r in self._fetch_all(
            m.quota_limits.select().where(q.project_id == project_id))}

    def quota_usage(self, project_id):
        with self._reader() as conn:
            return self._usage(conn, project_id)

    @staticmethod
    def _usage(conn, project_id):
        i, r = m.instances.c, m.quota_reservations.c
        inst = conn.execute(sa.select(
            sa.func.count(), sa.func.coalesce(sa.func.sum(i.vcpus), 0),
            sa.func.coalesce(sa.func.sum(i.memory_mb), 0)).where(
                i.project_id == project_id)).one()
        held = conn.execute(sa.select(
            sa.func.coalesce(sa.func.sum(r.cores), 0),
            sa.func.coalesce(sa.func.sum(r.ram_mb), 0)).where(
                r.project_id == project_id)).one()
        return {"instances": inst[0], "cores": inst[1] + held[0], "ram_mb": inst[2] + held[1]}

    def _reserve_quota(self, conn, migration_uuid, project_id, cores, ram_mb):
        """Reserve growth for a migration within the project's limits (in the
        caller's transaction; the limit rows are locked where the database
        can, so two resizes of one project cannot both take the last cores)."""
        q = m.quota_limits.c
        limits = {row.resource: row.hard_limit for row in conn.execute(
            sa.select(q.resource, q.hard_limit).where(q.project_id == project_id)
            .with_for_update())}
        usage = self._usage(conn, project_id)
        for resource, wanted in (("cores", cores), ("ram_mb", ram_mb)):
            limit = limits.get(resource)
            if wanted > 0 and limit is not None and usage[resource] + wanted > limit:
                raise exc.QuotaExceeded(
                    f"quota exceeded for project {project_id}: {resource} would be "
                    f"{usage[resource] + wanted}, limit {limit} "
                    f"({usage[resource]} in use, {wanted} more requested)")
        now = _now()
        conn.execute(m.quota_reservations.insert().values(
            migration_uuid=migration_uuid, project_id=project_id, cores=max(cores, 0),
            ram_mb=max(ram_mb, 0), created_at=now, updated_at=now))

    def list_quota_reservations(self, project_id=None):
        query = m.quota_reservations.select().order_by(m.quota_reservations.c.id)
        if project_id is not None:
            query = query.where(m.quota_reservations.c.project_id == project_id)
        return self._fetch_all(query)

    @staticmethod
    def _drop_reservation(conn, migration_uuid):
        conn.execute(m.quota_reservations.delete().where(
            m.quota_reservations.c.migration_uuid == migration_uuid))

    # -- resize / cold migration ---------------------------------------------------
    @_retry
    def abandon_resize(self, migration_uuid, instance_uuid, status, expected_statuses,
                       error, instance_values=None):
        """End a resize that rolled back: final status, instance released
        (task_state None), quota reservation dropped; one transaction.
        False (nothing changed) when the migration was not in
        ``expected_statuses``."""
        now = _now()
        with self._writer() as conn:
            res = conn.execute(m.migrations.update().where(
                m.migrations.c.uuid == migration_uuid,
                m.migrations.c.status.in_(list(expected_statuses)),
            ).values(status=status, error=error, finished_at=now, updated_at=now,
                     current_step=None))
            if res.rowcount != 1:
                return False
            self._drop_reservation(conn, migration_uuid)
            conn.execute(m.instances.update().where(
                m.instances.c.uuid == instance_uuid).values(
                    task_state=None, updated_at=now, **(instance_values or {})))
        return True

    @_retry
    def finish_resize(self, migration_uuid, power_state):
        """The guest runs (or is stopped) on the destination with the new
        flavor: the instance is RESIZED there, the destination claim becomes
        its usage, the source keeps holding the old flavor, the migration is
        ``finished``; one transaction.  Idempotent (False once finished)."""
        mig = self.get_migration(migration_uuid)
        old, new = mig["old_flavor"], mig["new_flavor"]
        now = _now()
        c = m.resource_claims.c
        with self._writer() as conn:
            res = conn.execute(m.migrations.update().where(
                m.migrations.c.uuid == migration_uuid,
                m.migrations.c.status == MoveStatus.POST_MIGRATING,
            ).values(status=MoveStatus.FINISHED, source_held=True, finished_at=now,
                     updated_at=now, current_step=None))
            if res.rowcount != 1:
                return False
            inst = conn.execute(m.instances.select().where(
                m.instances.c.uuid == mig["instance_uuid"])).one()
            conn.execute(m.instances.update().where(
                m.instances.c.uuid == mig["instance_uuid"]).values(
                    host=mig["dest_host"], vm_state=VmState.RESIZED, task_state=None,
                    power_state=power_state, updated_at=now, **_flavor_columns(new)))
            claim = conn.execute(m.resource_claims.select().where(
                c.migration_uuid == migration_uuid, c.host == mig["dest_host"])).first()
            if claim is not None:
                conn.execute(m.resource_claims.delete().where(c.id == claim.id))
            else:  # claimed nothing (cannot happen through the flow): count it now
                h = m.hosts.c
                mem, cpus, disk = _usage_of(new, inst.volume_backed)
                conn.execute(m.hosts.update().where(h.name == mig["dest_host"]).values(
                    memory_used_mb=h.memory_used_mb + mem, vcpus_used=h.vcpus_used + cpus,
                    disk_used_gb=h.disk_used_gb + disk, updated_at=now))
            # until confirm or revert the project pays for max(old, new)
            conn.execute(m.quota_reservations.update().where(
                m.quota_reservations.c.migration_uuid == migration_uuid).values(
                    cores=max(old["vcpus"] - new["vcpus"], 0),
                    ram_mb=max(old["memory_mb"] - new["memory_mb"], 0), updated_at=now))
        return True

    @_retry
    def confirm_resize_records(self, migration_uuid, power_state):
        """confirming → confirmed: the source's old flavor and the quota
        reservation released, the instance active (or stopped); one
        transaction.  Idempotent."""
        mig = self.get_migration(migration_uuid)
        now = _now()
        with self._writer() as conn:
            inst = self._end_resize(conn, mig, MoveStatus.CONFIRMING, MoveStatus.CONFIRMED,
                                    now)
            if inst is None:
                return False
            if mig["source_held"]:
                self._release(conn, mig["source_host"],
                              *_usage_of(mig["old_flavor"], inst.volume_backed))
            self._drop_reservation(conn, migration_uuid)
            conn.execute(m.instances.update().where(
                m.instances.c.uuid == mig["instance_uuid"]).values(
                    vm_state=vm_state_for(power_state), power_state=power_state,
                    task_state=None, updated_at=now))
        return True

    @_retry
    def revert_resize_records(self, migration_uuid, power_state):
        """reverting → reverted: the instance back on the source with the old
        flavor, the destination's new-flavor usage and the quota reservation
        released; one transaction.  Idempotent."""
        mig = self.get_migration(migration_uuid)
        now = _now()
        with self._writer() as conn:
            inst = self._end_resize(conn, mig, MoveStatus.REVERTING, MoveStatus.REVERTED, now)
            if inst is None:
                return False
            self._release(conn, mig["dest_host"],
                          *_usage_of(mig["new_flavor"], inst.volume_backed))
            if not mig["source_held"]:  # (cannot happen through the flows)
                self._consume(conn, mig["source_host"],
                              *_usage_of(mig["old_flavor"], inst.volume_backed))
            self._drop_reservation(conn, migration_uuid)
            conn.execute(m.instances.update().where(
                m.instances.c.uuid == mig["instance_uuid"]).values(
                    host=mig["source_host"], vm_state=vm_state_for(power_state),
                    power_state=power_state, task_state=None, updated_at=now,
                    **_flavor_columns(mig["old_flavor"])))
        return True

    @staticmethod
    def _end_resize(conn, mig, expected, status, now):
        """``expected`` → ``status`` (the source no longer held); returns the
        instance row, or None when the migration was not ``expected``."""
        res = conn.execute(m.migrations.update().where(
            m.migrations.c.uuid == mig["uuid"], m.migrations.c.status == expected,
        ).values(status=status, source_held=False, finished_at=now, updated_at=now,
                 current_step=None, error=None))
        if res.rowcount != 1:
            return None
        return conn.execute(m.instances.select().where(
            m.instances.c.uuid == mig["instance_uuid"])).one()

    # -- evacuation ---------------------------------------------------------------
    @_retry
    def finish_evacuation(self, migration_uuid, power_state, vm_state):
        """The guest was rebuilt on the destination: the instance lives there
        (the claim becomes its usage, the dead source's usage is released)
        and the evacuation is ``done`` (``completed`` when the source already
        destroyed its stale copy); one transaction.  Idempotent."""
        mig = self.get_migration(migration_uuid)
        now = _now()
        i, c, mg = m.instances.c, m.resource_claims.c, m.migrations.c
        # decided inside the UPDATE: the source may mark itself cleaned meanwhile
        status = sa.case((mg.source_cleaned == sa.true(), MoveStatus.COMPLETED.value),
                         else_=MoveStatus.DONE.value)
        with self._writer() as conn:
            res = conn.execute(m.migrations.update().where(
                mg.uuid == migration_uuid, mg.status == MoveStatus.PRE_MIGRATING,
            ).values(status=status, finished_at=now, updated_at=now, current_step=None))
            if res.rowcount != 1:
                return False
            inst = conn.execute(m.instances.select().where(
                i.uuid == mig["instance_uuid"])).one()
            conn.execute(m.instances.update().where(i.uuid == mig["instance_uuid"]).values(
                host=mig["dest_host"], task_state=None, vm_state=vm_state,
                power_state=power_state, updated_at=now))
            conn.execute(m.resource_claims.delete().where(
                c.migration_uuid == migration_uuid, c.host == mig["dest_host"]))
            if inst.host == mig["source_host"]:
                self._release(conn, mig["source_host"],
                              *_usage_of(flavor_of(inst._mapping), inst.volume_backed))
        return True

    @_retry
    def mark_source_cleaned(self, migration_uuid):
        """The evacuated instance's source destroyed its stale copy: ``done``
        becomes ``completed``; an evacuation still running completes when it
        finishes.  Returns the new status."""
        now = _now()
        mg = m.migrations.c
        with self._writer() as conn:
            conn.execute(m.migrations.update().where(mg.uuid == migration_uuid).values(
                source_cleaned=True, updated_at=now))
            conn.execute(m.migrations.update().where(
                mg.uuid == migration_uuid, mg.status == MoveStatus.DONE).values(
                    status=MoveStatus.COMPLETED, updated_at=now))
        return self.get_migration(migration_uuid)["status"]
