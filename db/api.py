"""The state database: hosts, instances, migrations, claims, ports, volumes.

Every function is one transaction.  Changes that race (claiming an
instance, claiming host resources, moving an instance) are conditional
UPDATEs whose row count decides the winner, so they are safe across
threads and processes on SQLite, PostgreSQL and MariaDB alike.
"""
import json
import os
import sqlite3
import uuid as uuidlib

import sqlalchemy as sa

from migrateflow import exceptions as exc
from migrateflow.db import attachments, moves, resizes
from migrateflow.db import engine as db_engine
from migrateflow.db import sqlite
from migrateflow.db import models as m
from migrateflow.db import observe
from migrateflow.db.common import now as _now, raw_update, retry as _retry, row as _row

_SEL_HOST = m.hosts.select().where(m.hosts.c.name == sa.bindparam("key"))
_raw_selects = {}
# statements run by every migration, built once (their cache keys with them)
_h = m.hosts.c
_SEL_HOSTS = m.hosts.select().order_by(_h.name)
_CONSUME = m.hosts.update().where(
    _h.name == sa.bindparam("b_host"),
    _h.memory_mb - _h.memory_reserved_mb - _h.memory_used_mb >= sa.bindparam("b_memory"),
    _h.disk_gb - _h.disk_used_gb >= sa.bindparam("b_disk"),
).values(memory_used_mb=_h.memory_used_mb + sa.bindparam("b_memory"),
         vcpus_used=_h.vcpus_used + sa.bindparam("b_vcpus"),
         disk_used_gb=_h.disk_used_gb + sa.bindparam("b_disk"),
         updated_at=sa.bindparam("b_now"))
_RAW_CONSUME = (
    "UPDATE hosts SET memory_used_mb = memory_used_mb + ?, vcpus_used = vcpus_used + ?, "
    "disk_used_gb = disk_used_gb + ?, updated_at = ? WHERE name = ? AND "
    "memory_mb - memory_reserved_mb - memory_used_mb >= ? AND disk_gb - disk_used_gb >= ?")
_RAW_RELEASE = (
    "UPDATE hosts SET memory_used_mb = memory_used_mb - ?, vcpus_used = vcpus_used - ?, "
    "disk_used_gb = disk_used_gb - ?, updated_at = ? WHERE name = ?")
_RELEASE = m.hosts.update().where(_h.name == sa.bindparam("b_host")).values(
    memory_used_mb=_h.memory_used_mb - sa.bindparam("b_memory"),
    vcpus_used=_h.vcpus_used - sa.bindparam("b_vcpus"),
    disk_used_gb=_h.disk_used_gb - sa.bindparam("b_disk"),
    updated_at=sa.bindparam("b_now"))


def _columns(table):
    return frozenset(table.c.keys())


def _raw_select(table, where, order=None):
    """(SQLite SELECT of ``table``'s rows matching ``where`` [by
    ``order``], column names, Boolean columns), made once."""
    key = (table.name, where, order)
    found = _raw_selects.get(key)
    if found is None:
        names = [c.name for c in table.columns]
        sql = f"SELECT {', '.join(names)} FROM {table.name} WHERE {where}"
        found = _raw_selects[key] = (
            sql + (f" ORDER BY {order}" if order else ""), names,
            [c.name for c in table.columns if isinstance(c.type, sa.Boolean)])
    return found


def _raw_dicts(rows, names, booleans):
    """SQLite's rows as dicts, the Boolean columns as bool."""
    found = [dict(zip(names, row)) for row in rows]
    for row in found:
        for name in booleans:
            if row[name] is not None:
                row[name] = bool(row[name])
    return found


def _host_dict(row):
    host = _row(row)
    if host is not None:
        host["cpu_features"] = json.loads(host["cpu_features"])
    return host


class StateDB(moves.MigrationRecords, resizes.ResizeRecords, attachments.Attachments):
    """Access to one state database (by URL)."""

    def __init__(self, url, synchronous="NORMAL"):
        self.url = url
        self._ctx = db_engine.get_context(url, synchronous)
        self._engine = self._read_engine = None

    # -- plumbing -------------------------------------------------------------
    # Every function is one transaction straight on the enginefacade's
    # engine (its error translation and pool included): the facade's
    # per-call context and transaction scope cost as much as the SQL itself.
    # Reads begin DEFERRED on SQLite, so they never queue for the write lock.
    def _writer(self):
        return self.engine.begin()

    def _reader(self):
        if self._read_engine is None:
            self._read_engine = self.engine.execution_options(
                **{sqlite.SQLITE_BEGIN_OPTION: "DEFERRED"})
        return self._read_engine.connect()

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self._ctx.writer.get_engine()
        return self._engine

    def _fetch_one(self, query, params=None):
        with self._reader() as conn:
            return conn.execute(query, params).first()

    # The few statements every step of every flow runs (a migration, an
    # instance or a host by key; a migration update) go straight to a
    # pooled sqlite3 connection on SQLite (see ``sqlite.execute_raw``).
    def _raw_sqlite(self):
        return self.engine.dialect.name == "sqlite"

    def _row_by(self, table, column, value, query):
        """The row of ``table`` whose unique ``column`` is ``value`` as a
        dict (None if none); ``query`` selects it elsewhere (bind "key")."""
        if not self._raw_sqlite():
            return _row(self._fetch_one(query, {"key": value}))
        sql, names, booleans = _raw_select(table, f"{column} = ?")
        found = _raw_dicts(sqlite.execute_raw(self.engine, sql, (value,)), names, booleans)
        return found[0] if found else None

    def _raw_writer(self):
        """A write transaction straight on this thread's own sqlite3
        connection (``sqlite.raw_transaction``) for a SQLite file, else
        None: the caller uses SQLAlchemy's (``_writer``)."""
        if self._raw_sqlite() and sqlite.raw_capable(self.engine):
            return sqlite.raw_transaction(self.engine)
        return None

    def _raw_instance_writer(self, table_values=()):
        """``_raw_writer`` for a transaction that changes instances, None
        while their state changes are announced (``observe`` watches
        SQLAlchemy's UPDATEs) or when a (table, values) pair of
        ``table_values`` names a column the table does not have."""
        if observe.announcing() or any(not set(values) <= _columns(table)
                                       for table, values in table_values):
            return None
        return self._raw_writer()

    def _raw_all(self, table, where, params, order):
        """The rows of ``table`` matching ``where`` (SQLite, ``?``
        parameters) by ``order``, as dicts (Booleans as bool), straight on
        a SQLite file; None elsewhere (the caller uses SQLAlchemy)."""
        if not (self._raw_sqlite() and sqlite.raw_capable(self.engine)):
            return None
        sql, names, booleans = _raw_select(table, where, order)
        return _raw_dicts(sqlite.execute_raw(self.engine, sql, params), names, booleans)

    def _raw_update(self, table, key_column, key, values, column=None, among=None):
        """UPDATE ``table`` SET ``values`` WHERE ``key_column`` = ``key``
        (and ``column`` IN ``among``) on SQLite; the row count, or None when
        it must go through SQLAlchemy (another database, an unknown column)."""
        if not self._raw_sqlite() or not set(values) <= _columns(table):
            return None
        return sqlite.execute_raw(self.engine, *raw_update(
            table.name, key_column, key, values, column, list(among or ())), write=True)

    def _fetch_all(self, query, params=None):
        with self._reader() as conn:
            return [_row(r) for r in conn.execute(query, params)]

    # -- hosts ------------------------------------------------------------------
    @_retry
    def create_host(self, name, *, hypervisor_type, hypervisor_version, cpu_model,
                    cpu_features=(), vcpus, memory_mb, disk_gb, shared_storage=None,
                    memory_reserved_mb=0, up=True, disabled=False):
        now = _now()
        with self._writer() as conn:
            conn.execute(m.hosts.insert().values(
                name=name, hypervisor_type=hypervisor_type,
                hypervisor_version=hypervisor_version, cpu_model=cpu_model,
                cpu_features=json.dumps(sorted(cpu_features)), vcpus=vcpus,
                vcpus_used=0, memory_mb=memory_mb, memory_reserved_mb=memory_reserved_mb,
                memory_used_mb=0, disk_gb=disk_gb, disk_used_gb=0,
                shared_storage=shared_storage, up=up, forced_down=False,
                disabled=disabled, created_at=now, updated_at=now))
        return self.get_host(name)

    @_retry
    def get_host(self, name):
        host = self.find_host(name)
        if host is None:
            raise exc.HostNotFound(name)
        return host

    @_retry
    def find_host(self, name):
        host = self._row_by(m.hosts, "name", name, _SEL_HOST)
        if host is not None:
            host["cpu_features"] = json.loads(host["cpu_features"])
        return host

    @_retry
    def list_hosts(self):
        hosts = self._raw_all(m.hosts, "1", (), "name")
        if hosts is None:
            with self._reader() as conn:
                return [_host_dict(r) for r in conn.execute(_SEL_HOSTS)]
        for host in hosts:
            host["cpu_features"] = json.loads(host["cpu_features"])
        return hosts

    @_retry
    def update_host(self, name, **values):
        values["updated_at"] = _now()
        with self._writer() as conn:
            res = conn.execute(m.hosts.update().where(m.hosts.c.name == name).values(**values))
        if res.rowcount != 1:
            raise exc.HostNotFound(name)

    # -- instances --------------------------------------------------------------
    @_retry
    def create_instance(self, *, name, host, flavor_name, memory_mb, vcpus, disk_gb,
                        volume_ids=(), port_count=1, volume_backed=False,
                        project_id="demo", uuid=None, vm_state="active",
                        power_state="running"):
        """Record an instance running on ``host`` with its ports and volumes.

        The host's usage grows by the flavor (refused when it does not fit);
        each port gets an ACTIVE binding and each volume a connection on the
        host.
        """
        now = _now()
        instance_uuid = uuid or str(uuidlib.uuid4())
        local_disk = 0 if volume_backed else disk_gb
        with self._writer() as conn:
            self._consume(conn, host, memory_mb, vcpus, local_disk)
            conn.execute(m.instances.insert().values(
                uuid=instance_uuid, name=name, project_id=project_id, host=host,
                vm_state=vm_state, task_state=None, power_state=power_state,
                flavor_name=flavor_name, memory_mb=memory_mb, vcpus=vcpus,
                disk_gb=disk_gb, volume_backed=volume_backed, image_ref=None,
                created_at=now, updated_at=now))
            for index in range(port_count):
                port_id = str(uuidlib.uuid4())
                mac = "fa:16:3e:%02x:%02x:%02x" % tuple(uuidlib.uuid4().bytes[:3])
                conn.execute(m.ports.insert().values(
                    id=port_id, instance_uuid=instance_uuid, network_id=f"net-{index}",
                    mac=mac, created_at=now, updated_at=now))
                conn.execute(m.port_bindings.insert().values(
                    port_id=port_id, host=host, status="ACTIVE", created_at=now,
                    updated_at=now))
            for index, volume_id in enumerate(volume_ids):
                conn.execute(m.block_devices.insert().values(
                    instance_uuid=instance_uuid, volume_id=volume_id,
                    device_name="/dev/vd" + "abcdefghijklmnop"[index],
                    boot_index=0 if (volume_backed and index == 0) else None,
                    created_at=now, updated_at=now))
                conn.execute(m.volume_connections.insert().values(
                    volume_id=volume_id, instance_uuid=instance_uuid, host=host,
                    connection_info=json.dumps({"target": f"iqn.{volume_id}"}),
                    created_at=now, updated_at=now))
        return self.get_instance(instance_uuid)

    def _consume(self, conn, host, memory_mb, vcpus, disk_gb):
        """Add usage to ``host`` only if it fits; else InsufficientResources.
        ``conn``: SQLAlchemy's, or a raw transaction's sqlite3 connection."""
        if isinstance(conn, sqlite3.Connection):
            changed = conn.execute(_RAW_CONSUME, (memory_mb, vcpus, disk_gb, _now(), host,
                                                  memory_mb, disk_gb)).rowcount
            row = None if changed == 1 else conn.execute(
                "SELECT memory_mb, memory_reserved_mb, memory_used_mb, disk_gb, disk_used_gb "
                "FROM hosts WHERE name = ?", (host,)).fetchone()
        else:
            changed = conn.execute(_CONSUME, {"b_host": host, "b_memory": memory_mb,
                                              "b_vcpus": vcpus, "b_disk": disk_gb,
                                              "b_now": _now()}).rowcount
            row = None if changed == 1 else conn.execute(_SEL_HOST, {"key": host}).first()
            row = row and (row.memory_mb, row.memory_reserved_mb, row.memory_used_mb,
                           row.disk_gb, row.disk_used_gb)
        if changed == 1:
            return
        if row is None:
            raise exc.HostNotFound(host)
        memory, reserved, used, disk, disk_used = row
        raise exc.InsufficientResources(
            f"host {host} cannot hold {memory_mb} MB memory and {disk_gb} GB disk: "
            f"{memory - reserved - used} MB memory and {disk - disk_used} GB disk free")

    @staticmethod
    def _release(conn, host, memory_mb, vcpus, disk_gb):
        """Take usage off ``host``; ``conn``: SQLAlchemy's or a raw
        transaction's sqlite3 connection."""
        if isinstance(conn, sqlite3.Connection):
            conn.execute(_RAW_RELEASE, (memory_mb, vcpus, disk_gb, _now(), host))
            return
        conn.execute(_RELEASE, {"b_host": host, "b_memory": memory_mb, "b_vcpus": vcpus,
                                "b_disk": disk_gb, "b_now": _now()})

    @_retry
    def get_instance(self, instance_uuid):
        inst = self._row_by(m.instances, "uuid", instance_uuid, moves.SELECT_INSTANCE)
        if inst is None:
            raise exc.InstanceNotFound(instance_uuid)
        return inst

    @_retry
    def list_instances(self, host=None):
        query = m.instances.select().order_by(m.instances.c.name)
        if host is not None:
            query = query.where(m.instances.c.host == host)
        return self._fetch_all(query)

    @_retry
    def update_instance(self, instance_uuid, expected=None, **values):
        """Update an instance; with ``expected`` only if those columns match.

        Returns True when the row changed (the compare-and-swap won).
        """
        values["updated_at"] = _now()
        if not expected and not observe.announcing():
            count = self._raw_update(m.instances, "uuid", instance_uuid, values)
            if count is not None:
                return count == 1
        if not expected:
            with self._writer() as conn:
                return conn.execute(moves.UPDATE_INSTANCE, dict(values, b_uuid=instance_uuid)
                                    ).rowcount == 1
        query = m.instances.update().where(m.instances.c.uuid == instance_uuid)
        for column, value in expected.items():
            col = m.instances.c[column]
            query = query.where(col.is_(None) if value is None else col == value)
        with self._writer() as conn:
            return conn.execute(query.values(**values)).rowcount == 1


_databases = {}


def get_db(conf=None):
    """The state database named by ``[database]/connection`` (cached)."""
    if conf is None:
        from migrateflow.conf import CONF as conf
    url = conf.database.connection
    if not url:
        url = "sqlite:///" + os.path.join(os.path.abspath(conf.state_path), "state.sqlite")
    db = _databases.get(url)
    if db is None:
        db = StateDB(url, conf.persistence.sqlite_synchronous)
        from migrateflow.db import migration
        if migration.current_revision(db.engine) != migration.head_revision():
            migration.upgrade(db.engine)
        _databases[url] = db
    return db


def forget_db(url):
    _databases.pop(url, None)
    db_engine.forget(url)


def instance_to_driver(inst):
    """The plain dict a driver gets for an instance."""
    return {k: inst[k] for k in ("uuid", "name", "memory_mb", "vcpus", "disk_gb",
                                 "volume_backed")}
