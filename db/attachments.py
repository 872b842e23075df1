"""State database: ports and their bindings, block devices and volume
connections: the records of the embedded network and volume services
(mixed into ``StateDB``)."""
import json

import sqlalchemy as sa

from migrateflow.db import models as m
from migrateflow.db.common import now as _now, retry as _retry

# statements run by every migration, built once (their cache keys with them)
_b, _v = m.port_bindings.c, m.volume_connections.c
_PORTS = sa.bindparam("b_ports", expanding=True)
_VOLUMES = sa.bindparam("b_volumes", expanding=True)
_HOST = sa.bindparam("b_host")
_SEL_PORTS = m.ports.select().where(
    m.ports.c.instance_uuid == sa.bindparam("b_instance")).order_by(m.ports.c.network_id)
_SEL_BLOCK_DEVICES = m.block_devices.select().where(
    m.block_devices.c.instance_uuid == sa.bindparam("b_instance")).order_by(
        m.block_devices.c.device_name)
_SEL_BOUND = sa.select(_b.port_id).where(_b.host == _HOST, _b.port_id.in_(_PORTS))
_INS_BINDING = m.port_bindings.insert()
_ACTIVATE_BINDINGS = m.port_bindings.update().where(
    _b.host == _HOST, _b.port_id.in_(_PORTS), _b.status != "ACTIVE")
_DEL_OTHER_BINDINGS = m.port_bindings.delete().where(_b.host != _HOST, _b.port_id.in_(_PORTS))
_SEL_CONNECTED = sa.select(_v.volume_id).where(_v.host == _HOST, _v.volume_id.in_(_VOLUMES))
_INS_CONNECTION = m.volume_connections.insert()
_DEL_CONNECTIONS = m.volume_connections.delete().where(
    _v.host == _HOST, _v.volume_id.in_(_VOLUMES))
# the same on SQLite, straight on a raw transaction's connection
_RAW_INS_BINDING = ("INSERT INTO port_bindings (port_id, host, status, migration_uuid, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
_RAW_INS_CONNECTION = ("INSERT INTO volume_connections (volume_id, instance_uuid, host, "
                       "migration_uuid, connection_info, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _raw_add_missing(db, table, column, host, keys, insert, row_of):
    """Insert ``row_of(key)`` (``insert``) for each of ``keys`` (``column``)
    that ``table`` does not hold on ``host`` yet; how many were inserted."""
    marks = ", ".join("?" * len(keys))
    existing = {row[0] for row in db.execute(
        f"SELECT {column} FROM {table} WHERE host = ? AND {column} IN ({marks})",
        (host, *keys))}
    db.executemany(insert, [row_of(key) for key in keys if key not in existing])
    return len(set(keys) - existing)


def _connection_info(volume_id, host):
    return json.dumps({"target": f"iqn.{volume_id}", "host": host})


class Attachments:
    """Ports, bindings, volumes; needs StateDB's plumbing."""

    # -- ports and bindings (the embedded network service's records) ----------
    def list_ports(self, instance_uuid):
        ports = self._raw_all(m.ports, "instance_uuid = ?", (instance_uuid,), "network_id")
        if ports is None:
            ports = self._fetch_all(_SEL_PORTS, {"b_instance": instance_uuid})
        return ports

    def list_port_bindings(self, instance_uuid=None, host=None):
        b = m.port_bindings.c
        query = sa.select(m.port_bindings, m.ports.c.instance_uuid).join(
            m.ports, m.ports.c.id == b.port_id).order_by(b.port_id, b.host)
        if instance_uuid is not None:
            query = query.where(m.ports.c.instance_uuid == instance_uuid)
        if host is not None:
            query = query.where(b.host == host)
        return self._fetch_all(query)

    @_retry
    def add_port_bindings(self, port_ids, host, status, migration_uuid=None):
        """Create a binding per port on ``host`` unless one exists."""
        port_ids, now = list(port_ids), _now()
        raw = self._raw_writer()
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                return _raw_add_missing(
                    db, "port_bindings", "port_id", host, port_ids, _RAW_INS_BINDING,
                    lambda port_id: (port_id, host, status, migration_uuid, now, now))
        with self._writer() as conn:
            existing = set(conn.execute(_SEL_BOUND, {"b_host": host,
                                                     "b_ports": port_ids}).scalars())
            for port_id in port_ids:
                if port_id not in existing:
                    conn.execute(_INS_BINDING, {
                        "port_id": port_id, "host": host, "status": status,
                        "migration_uuid": migration_uuid, "created_at": now,
                        "updated_at": now})
        return len(set(port_ids) - existing)

    @_retry
    def delete_port_bindings(self, port_ids, host, status=None):
        b = m.port_bindings.c
        query = m.port_bindings.delete().where(b.host == host, b.port_id.in_(list(port_ids)))
        if status is not None:
            query = query.where(b.status == status)
        with self._writer() as conn:
            return conn.execute(query).rowcount

    @_retry
    def activate_port_bindings(self, port_ids, host):
        """Make ``host``'s bindings ACTIVE and drop every other binding."""
        port_ids, raw = list(port_ids), self._raw_writer()
        if raw is not None:  # the same, straight on SQLite
            marks = ", ".join("?" * len(port_ids))
            with raw as db:
                changed = db.execute(
                    "UPDATE port_bindings SET status = 'ACTIVE', updated_at = ? WHERE host = ? "
                    f"AND port_id IN ({marks}) AND status != 'ACTIVE'",
                    (_now(), host, *port_ids)).rowcount
                changed += db.execute(f"DELETE FROM port_bindings WHERE host != ? AND port_id "
                                      f"IN ({marks})", (host, *port_ids)).rowcount
            return changed
        where = {"b_host": host, "b_ports": port_ids}
        with self._writer() as conn:
            changed = conn.execute(_ACTIVATE_BINDINGS, dict(
                where, status="ACTIVE", updated_at=_now())).rowcount
            changed += conn.execute(_DEL_OTHER_BINDINGS, where).rowcount
        return changed

    # -- block devices and volume connections (the volume service's records) --
    def list_block_devices(self, instance_uuid):
        devices = self._raw_all(m.block_devices, "instance_uuid = ?", (instance_uuid,),
                                "device_name")
        if devices is None:
            devices = self._fetch_all(_SEL_BLOCK_DEVICES, {"b_instance": instance_uuid})
        return devices

    def list_volume_connections(self, instance_uuid=None, host=None):
        v = m.volume_connections.c
        query = m.volume_connections.select().order_by(v.volume_id, v.host)
        if instance_uuid is not None:
            query = query.where(v.instance_uuid == instance_uuid)
        if host is not None:
            query = query.where(v.host == host)
        return self._fetch_all(query)

    @_retry
    def add_volume_connections(self, instance_uuid, volume_ids, host, migration_uuid=None):
        volume_ids, now = list(volume_ids), _now()
        raw = self._raw_writer()
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                return _raw_add_missing(
                    db, "volume_connections", "volume_id", host, volume_ids,
                    _RAW_INS_CONNECTION, lambda volume_id: (
                        volume_id, instance_uuid, host, migration_uuid,
                        _connection_info(volume_id, host), now, now))
        with self._writer() as conn:
            existing = set(conn.execute(_SEL_CONNECTED, {
                "b_host": host, "b_volumes": volume_ids}).scalars())
            for volume_id in volume_ids:
                if volume_id not in existing:
                    conn.execute(_INS_CONNECTION, {
                        "volume_id": volume_id, "instance_uuid": instance_uuid,
                        "host": host, "migration_uuid": migration_uuid,
                        "connection_info": _connection_info(volume_id, host),
                        "created_at": now, "updated_at": now})
        return len(set(volume_ids) - existing)

    @_retry
    def delete_volume_connections(self, volume_ids, host):
        volume_ids, raw = list(volume_ids), self._raw_writer()
        if raw is not None:  # the same, straight on SQLite
            with raw as db:
                return db.execute(
                    "DELETE FROM volume_connections WHERE host = ? AND volume_id IN "
                    f"({', '.join('?' * len(volume_ids))})", (host, *volume_ids)).rowcount
        with self._writer() as conn:
            return conn.execute(_DEL_CONNECTIONS, {"b_host": host,
                                                   "b_volumes": volume_ids}).rowcount
