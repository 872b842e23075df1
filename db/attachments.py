"""State database: ports and their bindings, block devices and volume
connections: the records of the embedded network and volume services
(mixed into ``StateDB``)."""
import json

import sqlalchemy as sa

from migrateflow.db import models as m
from migrateflow.db.common import now as _now, retry as _retry


class Attachments:
    """Ports, bindings, volumes; needs StateDB's plumbing."""

    # -- ports and bindings (the embedded network service's records) ----------
    def list_ports(self, instance_uuid):
        return self._fetch_all(m.ports.select().where(
            m.ports.c.instance_uuid == instance_uuid).order_by(m.ports.c.network_id))

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
        b = m.port_bindings.c
        now = _now()
        with self._writer() as conn:
            existing = {r.port_id for r in conn.execute(sa.select(b.port_id).where(
                b.host == host, b.port_id.in_(list(port_ids))))}
            for port_id in port_ids:
                if port_id not in existing:
                    conn.execute(m.port_bindings.insert().values(
                        port_id=port_id, host=host, status=status,
                        migration_uuid=migration_uuid, created_at=now, updated_at=now))
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
        b = m.port_bindings.c
        port_ids = list(port_ids)
        with self._writer() as conn:
            changed = conn.execute(m.port_bindings.update().where(
                b.host == host, b.port_id.in_(port_ids), b.status != "ACTIVE").values(
                    status="ACTIVE", updated_at=_now())).rowcount
            changed += conn.execute(m.port_bindings.delete().where(
                b.host != host, b.port_id.in_(port_ids))).rowcount
        return changed

    # -- block devices and volume connections (the volume service's records) --
    def list_block_devices(self, instance_uuid):
        return self._fetch_all(m.block_devices.select().where(
            m.block_devices.c.instance_uuid == instance_uuid).order_by(
                m.block_devices.c.device_name))

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
        v = m.volume_connections.c
        now = _now()
        with self._writer() as conn:
            existing = {r.volume_id for r in conn.execute(sa.select(v.volume_id).where(
                v.host == host, v.volume_id.in_(list(volume_ids))))}
            for volume_id in volume_ids:
                if volume_id not in existing:
                    conn.execute(m.volume_connections.insert().values(
                        volume_id=volume_id, instance_uuid=instance_uuid, host=host,
                        migration_uuid=migration_uuid,
                        connection_info=json.dumps({"target": f"iqn.{volume_id}", "host": host}),
                        created_at=now, updated_at=now))
        return len(set(volume_ids) - existing)

    @_retry
    def delete_volume_connections(self, volume_ids, host):
        v = m.volume_connections.c
        with self._writer() as conn:
            return conn.execute(m.volume_connections.delete().where(
                v.host == host, v.volume_id.in_(list(volume_ids)))).rowcount
