"""State database: migration records, resource claims and the move of an
instance's usage from one host to another (mixed into ``StateDB``)."""
import json
import uuid as uuidlib

import sqlalchemy as sa

from migrateflow import exceptions as exc
from migrateflow.db import models as m
from migrateflow.db.common import now as _now, raw_update, retry as _retry

_MIG = m.migrations.c
_SEL_MIGRATION = m.migrations.select().where(_MIG.uuid == sa.bindparam("key"))
#: the SET clause comes from the parameters' keys (compiled once per key set)
_UPD_MIGRATION = m.migrations.update().where(_MIG.uuid == sa.bindparam("b_uuid"))
_UPD_MIGRATION_FROM = _UPD_MIGRATION.where(
    _MIG.status.in_(sa.bindparam("b_statuses", expanding=True)))
_UPD_MIGRATION_STEP = _UPD_MIGRATION.where(_MIG.current_step == sa.bindparam("b_step"))
# the other statements every migration runs, built once (cache keys with them)
_I, _C = m.instances.c, m.resource_claims.c
_INS_MIGRATION = m.migrations.insert()
_CLAIM_INSTANCE = m.instances.update().where(
    _I.uuid == sa.bindparam("b_uuid"), _I.task_state.is_(None),
    _I.host == sa.bindparam("b_host"))
#: an instance by uuid; the SET clause from the parameters (also StateDB's)
UPDATE_INSTANCE = m.instances.update().where(_I.uuid == sa.bindparam("b_uuid"))
_UPD_INSTANCE_ON = UPDATE_INSTANCE.where(_I.host == sa.bindparam("b_host"))
#: an instance by uuid (bind "key"; also StateDB's)
SELECT_INSTANCE = m.instances.select().where(_I.uuid == sa.bindparam("key"))
_SEL_CLAIM = m.resource_claims.select().where(
    _C.migration_uuid == sa.bindparam("b_migration"), _C.host == sa.bindparam("b_host"))
_INS_CLAIM = m.resource_claims.insert()
_DEL_CLAIM = m.resource_claims.delete().where(_C.id == sa.bindparam("b_id"))
_RAW_SEL_CLAIM = "SELECT id FROM resource_claims WHERE migration_uuid = ? AND host = ?"
_RAW_INS_CLAIM = ("INSERT INTO resource_claims (migration_uuid, instance_uuid, host, memory_mb, "
                  "vcpus, disk_gb, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


class MigrationRecords:
    """Migrations and the resources they hold; needs StateDB's plumbing."""

    # -- migrations -------------------------------------------------------------
    @_retry
    def start_migration(self, instance_uuid, *, migration_type, task_state, source_host,
                        requested_dest=None, block_migration=None, status="queued",
                        dest_host=None, memory_total_mb=0, disk_total_gb=0,
                        scheduler_notes=None, old_flavor=None, new_flavor=None,
                        quota=None):
        """Claim the instance (task_state None → ``task_state``) and record a
        migration, in one transaction.  The loser of a race gets InstanceBusy.

        ``quota``: {project_id, cores, ram_mb} the move needs beyond the
        instance's flavor; reserved in the same transaction (QuotaExceeded
        when the project's limits do not allow it).
        """
        now = _now()
        migration_uuid = str(uuidlib.uuid4())
        record = dict(
            uuid=migration_uuid, instance_uuid=instance_uuid,
            migration_type=migration_type, status=status, source_host=source_host,
            dest_host=dest_host, requested_dest=requested_dest,
            block_migration=block_migration, memory_total_mb=memory_total_mb,
            memory_processed_mb=0, memory_remaining_mb=memory_total_mb,
            disk_total_gb=disk_total_gb, disk_processed_gb=0, disk_remaining_gb=0,
            dirty_rate_mbps=0.0, iteration=0, post_copy=False,
            scheduler_notes=json.dumps(scheduler_notes or {}),
            abort_requested=False, force_complete_requested=False,
            old_flavor=json.dumps(old_flavor) if old_flavor else None,
            new_flavor=json.dumps(new_flavor) if new_flavor else None,
            source_held=False, source_cleaned=False,
            created_at=now, updated_at=now)
        raw = None if quota else self._raw_instance_writer()
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                if db.execute("UPDATE instances SET task_state = ?, updated_at = ? WHERE "
                              "uuid = ? AND task_state IS NULL AND host = ?",
                              (task_state, now, instance_uuid, source_host)).rowcount != 1:
                    found = db.execute("SELECT task_state, host FROM instances WHERE uuid = ?",
                                       (instance_uuid,)).fetchone()
                    _refuse_claim(instance_uuid, source_host, *(found or (None, None)),
                                  found is not None)
                db.execute(f"INSERT INTO migrations ({', '.join(record)}) VALUES "
                           f"({', '.join('?' * len(record))})", tuple(record.values()))
            return self.get_migration(migration_uuid)
        with self._writer() as conn:
            res = conn.execute(_CLAIM_INSTANCE, {"b_uuid": instance_uuid, "b_host": source_host,
                                                 "task_state": task_state, "updated_at": now})
            if res.rowcount != 1:
                row = conn.execute(SELECT_INSTANCE, {"key": instance_uuid}).first()
                _refuse_claim(instance_uuid, source_host, row and row.task_state,
                              row and row.host, row is not None)
            if quota:
                self._reserve_quota(conn, migration_uuid, **quota)
            conn.execute(_INS_MIGRATION, record)
        return self.get_migration(migration_uuid)

    @_retry
    def get_migration(self, migration_uuid):
        mig = self._row_by(m.migrations, "uuid", migration_uuid, _SEL_MIGRATION)
        if mig is None:
            raise exc.MigrationNotFound(migration_uuid)
        return _decode(mig)

    @_retry
    def list_migrations(self, instance_uuid=None, status=None, statuses=None,
                        migration_type=None, source_host=None):
        query = m.migrations.select().order_by(m.migrations.c.created_at, m.migrations.c.id)
        if migration_type is not None:
            query = query.where(m.migrations.c.migration_type == migration_type)
        if source_host is not None:
            query = query.where(m.migrations.c.source_host == source_host)
        if instance_uuid is not None:
            query = query.where(m.migrations.c.instance_uuid == instance_uuid)
        if status is not None:
            query = query.where(m.migrations.c.status == status)
        if statuses is not None:
            query = query.where(m.migrations.c.status.in_(list(statuses)))
        return [_decode(mig) for mig in self._fetch_all(query)]

    @_retry
    def update_migration(self, migration_uuid, expected_statuses=None, **values):
        """Update a migration; with ``expected_statuses`` only from those.

        Returns True when the row changed.
        """
        values["updated_at"] = _now()
        count = self._raw_update(m.migrations, "uuid", migration_uuid, values) \
            if expected_statuses is None else self._raw_update(
                m.migrations, "uuid", migration_uuid, values, "status", list(expected_statuses))
        if count is not None:
            return count == 1
        params = dict(values, b_uuid=migration_uuid)
        query = _UPD_MIGRATION
        if expected_statuses is not None:
            query, params["b_statuses"] = _UPD_MIGRATION_FROM, list(expected_statuses)
        with self._writer() as conn:
            return conn.execute(query, params).rowcount == 1

    @_retry
    def replace_current_step(self, migration_uuid, expected, step):
        """Set ``current_step`` to ``step`` only while it is ``expected``
        (not None); True when the row changed."""
        values = {"current_step": step, "updated_at": _now()}
        count = self._raw_update(m.migrations, "uuid", migration_uuid, values,
                                 "current_step", [expected])
        if count is not None:
            return count == 1
        with self._writer() as conn:
            return conn.execute(_UPD_MIGRATION_STEP, dict(
                values, b_uuid=migration_uuid, b_step=expected)).rowcount == 1

    @_retry
    def finish_migration(self, migration_uuid, instance_uuid, status, expected_statuses,
                         instance_values=None, **values):
        """Release the instance (task_state None, plus ``instance_values``)
        and give the migration its final status, in one transaction, so
        nobody sees a finished migration whose instance is still busy.

        Returns False (and changes nothing) when the migration was not in
        one of ``expected_statuses``.
        """
        now = _now()
        mig_values = dict(values, status=status, finished_at=now, updated_at=now)
        inst_values = dict(instance_values or {}, task_state=None, updated_at=now)
        raw = self._raw_instance_writer([(m.migrations, mig_values),
                                         (m.instances, inst_values)])
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                if db.execute(*raw_update("migrations", "uuid", migration_uuid, mig_values,
                                          "status", list(expected_statuses))).rowcount != 1:
                    return False
                db.execute(*raw_update("instances", "uuid", instance_uuid, inst_values))
            return True
        with self._writer() as conn:
            res = conn.execute(_UPD_MIGRATION_FROM, dict(
                values, status=status, finished_at=now, updated_at=now, b_uuid=migration_uuid,
                b_statuses=list(expected_statuses)))
            if res.rowcount != 1:
                return False
            conn.execute(UPDATE_INSTANCE, dict(instance_values or {}, task_state=None,
                                             updated_at=now, b_uuid=instance_uuid))
        return True

    @_retry
    def add_scheduler_note(self, migration_uuid, host, reason):
        """Remember why ``host`` was refused (idempotent per host)."""
        with self._writer() as conn:
            row = conn.execute(sa.select(m.migrations.c.scheduler_notes).where(
                m.migrations.c.uuid == migration_uuid)).first()
            notes = json.loads(row.scheduler_notes or "{}") if row else {}
            if notes.get(host) == reason:
                return
            notes[host] = reason
            conn.execute(m.migrations.update().where(
                m.migrations.c.uuid == migration_uuid).values(
                    scheduler_notes=json.dumps(notes), updated_at=_now()))

    # -- resource claims --------------------------------------------------------
    @_retry
    def claim_resources(self, migration_uuid, instance, host):
        """Hold the instance's resources on ``host`` for the migration.

        Idempotent: an existing claim of this migration on this host is kept.
        """
        local_disk = 0 if instance["volume_backed"] else instance["disk_gb"]
        claim = dict(migration_uuid=migration_uuid, instance_uuid=instance["uuid"], host=host,
                     memory_mb=instance["memory_mb"], vcpus=instance["vcpus"],
                     disk_gb=local_disk)
        raw = self._raw_writer()
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                if db.execute(_RAW_SEL_CLAIM, (migration_uuid, host)).fetchone():
                    return False
                self._consume(db, host, instance["memory_mb"], instance["vcpus"], local_disk)
                now = _now()
                db.execute(_RAW_INS_CLAIM, (*claim.values(), now, now))
            return True
        with self._writer() as conn:
            existing = conn.execute(_SEL_CLAIM, {"b_migration": migration_uuid,
                                                 "b_host": host}).first()
            if existing is not None:
                return False
            self._consume(conn, host, instance["memory_mb"], instance["vcpus"], local_disk)
            now = _now()
            conn.execute(_INS_CLAIM, dict(claim, created_at=now, updated_at=now))
        return True

    @_retry
    def drop_claim(self, migration_uuid, host):
        """Give the claimed resources back (idempotent)."""
        with self._writer() as conn:
            claim = conn.execute(_SEL_CLAIM, {"b_migration": migration_uuid,
                                              "b_host": host}).first()
            if claim is None:
                return False
            conn.execute(_DEL_CLAIM, {"b_id": claim.id})
            self._release(conn, host, claim.memory_mb, claim.vcpus, claim.disk_gb)
        return True

    @_retry
    def list_claims(self, host=None, migration_uuid=None):
        query = m.resource_claims.select().order_by(m.resource_claims.c.id)
        if host is not None:
            query = query.where(m.resource_claims.c.host == host)
        if migration_uuid is not None:
            query = query.where(m.resource_claims.c.migration_uuid == migration_uuid)
        return self._fetch_all(query)

    @_retry
    def move_instance(self, migration_uuid, instance_uuid, source, dest, **values):
        """Record that the instance now runs on ``dest``.

        The destination claim becomes the instance's usage there and the
        source's usage is released.  Idempotent: once the instance is on
        ``dest`` nothing changes.
        """
        now = _now()
        inst_values = dict(values, host=dest, updated_at=now)
        raw = self._raw_instance_writer([(m.instances, inst_values)])
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                if db.execute(*raw_update("instances", "uuid", instance_uuid, inst_values,
                                          "host", [source])).rowcount != 1:
                    return False
                memory, vcpus, disk, volume_backed = db.execute(
                    "SELECT memory_mb, vcpus, disk_gb, volume_backed FROM instances "
                    "WHERE uuid = ?", (instance_uuid,)).fetchone()
                local_disk = 0 if volume_backed else disk
                claim = db.execute(_RAW_SEL_CLAIM, (migration_uuid, dest)).fetchone()
                if claim is not None:
                    db.execute("DELETE FROM resource_claims WHERE id = ?", (claim[0],))
                else:  # the usage is the instance's, claimed or not
                    self._release(db, dest, -memory, -vcpus, -local_disk)
                self._release(db, source, memory, vcpus, local_disk)
            return True
        with self._writer() as conn:
            res = conn.execute(_UPD_INSTANCE_ON, dict(
                values, host=dest, updated_at=now, b_uuid=instance_uuid, b_host=source))
            if res.rowcount != 1:
                return False
            inst = conn.execute(SELECT_INSTANCE, {"key": instance_uuid}).first()
            claim = conn.execute(_SEL_CLAIM, {"b_migration": migration_uuid,
                                              "b_host": dest}).first()
            local_disk = 0 if inst.volume_backed else inst.disk_gb
            if claim is not None:
                conn.execute(_DEL_CLAIM, {"b_id": claim.id})
            else:  # the usage is the instance's, claimed or not
                self._release(conn, dest, -inst.memory_mb, -inst.vcpus, -local_disk)
            self._release(conn, source, inst.memory_mb, inst.vcpus, local_disk)
        return True


def _refuse_claim(instance_uuid, source_host, task_state, host, found):
    """Why the instance could not be claimed for a migration from ``source_host``."""
    if not found:
        raise exc.InstanceNotFound(instance_uuid)
    if task_state is not None:
        raise exc.InstanceBusy(f"instance {instance_uuid} is busy: task_state is "
                               f"{task_state!r}; wait for that operation to end")
    raise exc.InstanceInvalidState(
        f"instance {instance_uuid} is on host {host!r}, not {source_host!r}")


def _decode(mig):
    mig["scheduler_notes"] = json.loads(mig["scheduler_notes"] or "{}")
    for key in ("old_flavor", "new_flavor"):
        mig[key] = json.loads(mig[key]) if mig[key] else None
    return mig
