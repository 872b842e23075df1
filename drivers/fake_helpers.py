"""The fake driver's test and demo helpers (not part of the driver
contract), as a mixin of ``FakeDriver``: build the model cloud, look into
it (guests, VIFs, volume connections, files, timeline, side-effect
counters) and inject faults into its calls."""
import json

from migrateflow import exceptions
from migrateflow.drivers import base
from migrateflow.drivers import fake_model as model

FAULT_ACTIONS = ("raise", "hang", "kill")
FAULT_PHASES = ("before", "after")
#: Facts of a new host, in the column order of the hosts table.
HOST_DEFAULTS = {
    "hypervisor_type": "QEMU", "hypervisor_version": 7002000,
    "cpu_model": "Haswell-noTSX", "cpu_features": ["sse4.2", "avx", "avx2"],
    "memory_mb": 65536, "disk_gb": 1000, "shared_storage": None,
    "link_mbps": 1024.0, "up": True,
}


class Helpers:
    """Needs FakeDriver's ``_tx`` and ``_store``."""

    def add_host(self, name, **facts):
        """Create the host with HOST_DEFAULTS, then set the given facts
        (an upsert: calling it again only changes what is passed)."""
        unknown = set(facts) - set(HOST_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown host facts: {', '.join(sorted(unknown))}")
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO hosts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (name, *_encode_facts(HOST_DEFAULTS).values()))
            for fact, value in _encode_facts(facts).items():
                db.execute(f"UPDATE hosts SET {fact} = ? WHERE name = ?", (value, name))

    def set_host_up(self, name, up):
        with self._tx() as db:
            if not db.execute("UPDATE hosts SET up = ? WHERE name = ?",
                              (int(bool(up)), name)).rowcount:
                raise exceptions.HostNotFound(name)

    def guests(self, host):
        """[{host, uuid, name, state, persistent, memory_mb, disk_gb, vcpus,
        dirty_rate_mbps}] defined on ``host``, by uuid."""
        rows = self._rows("SELECT * FROM guests WHERE host = ? ORDER BY uuid", host)
        return [dict(row, persistent=bool(row["persistent"])) for row in rows]

    def vifs(self, host):
        """[{host, port_id, instance, device, bridge}] plugged on ``host``."""
        return self._rows("SELECT * FROM vifs WHERE host = ? ORDER BY port_id", host)

    def volume_connections(self, host):
        """[{host, volume_id, instance}] connected to ``host``'s hypervisor."""
        return self._rows("SELECT * FROM volume_connections WHERE host = ? "
                          "ORDER BY volume_id", host)

    def files(self, host):
        """[{location, path, instance, disk_gb}] in ``host``'s storage (seen
        by every host of its shared_storage group)."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM hosts WHERE name = ?", (host,)).fetchone()
        if row is None:
            raise exceptions.HostNotFound(host)
        return self._rows("SELECT * FROM files WHERE location = ? ORDER BY path",
                          model.storage_of(row))

    def set_dirty_rate(self, instance_uuid, mbps):
        """How fast the guest (every copy of it) dirties memory, MiB/s."""
        with self._tx() as db:
            db.execute("UPDATE guests SET dirty_rate_mbps = ? WHERE uuid = ?",
                       (float(mbps), instance_uuid))

    def reset(self):
        """Drop every host, guest, job, fault, counter and timeline event."""
        self._store.reset()

    def inject_fault(self, method, action="raise", host=None, instance=None, count=1,
                     when="before", message=None):
        """Arm a fault for ``count`` calls (-1: forever); returns its id."""
        if method not in base.ComputeDriver.__abstractmethods__:
            raise ValueError(f"{method!r} is not a ComputeDriver method")
        if action not in FAULT_ACTIONS or when not in FAULT_PHASES:
            raise ValueError(f"bad fault action {action!r} or phase {when!r}")
        with self._tx() as db:
            return db.execute(
                "INSERT INTO faults (method, action, host, instance, remaining, phase, "
                "message) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (method, action, host, instance, count, when, message)).lastrowid

    def clear_faults(self):
        with self._tx() as db:
            db.execute("DELETE FROM faults")

    def release_hangs(self):
        """Wake every hanging call in every process (they raise InjectedFault)."""
        with self._tx() as db:
            model.bump_marker(db, "release")

    def timeline(self, instance=None):
        """[{time, event, host, instance}] in order; events are the names of
        state-changing methods and migration.started/completed/cancelled/failed."""
        sql = "SELECT time, event, host, instance FROM timeline"
        if instance is None:
            return self._rows(sql + " ORDER BY id")
        return self._rows(sql + " WHERE instance = ? ORDER BY id", instance)

    def counters(self):
        """{(method, host, instance_uuid): side effects}; uuid "" if none."""
        rows = self._rows("SELECT * FROM counters")
        return {(row["method"], row["host"], row["instance"]): row["n"] for row in rows}

    def side_effects(self, instance_uuid):
        """{(method, host): side effects} for one instance."""
        return {(method, host): n for (method, host, uuid), n in self.counters().items()
                if uuid == instance_uuid}

    def _rows(self, sql, *params):
        with self._tx(write=False) as db:
            return [dict(row) for row in db.execute(sql, params)]


def _encode_facts(facts):
    """Host facts as stored: the feature list as JSON, up as 0/1."""
    encoded = dict(facts)
    if "cpu_features" in encoded:
        encoded["cpu_features"] = json.dumps(sorted(encoded["cpu_features"]))
    if "up" in encoded:
        encoded["up"] = int(bool(encoded["up"]))
    return encoded
