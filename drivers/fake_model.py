"""The fake hypervisors' model: the shared SQLite state, faults, counters.

Several processes (controller, workers, tests, the demo) drive the same fake
cloud, so every fact lives in one SQLite file and every operation is one short
transaction.  Read-modify-write operations use ``BEGIN IMMEDIATE`` so two
processes never interleave between reading a row and writing it back.

The live-migration jobs and their pre-copy simulation are in ``fake_jobs``.
"""
import contextlib
import functools
import inspect
import json
import os
import signal
import sqlite3
import threading
import time

from migrateflow import exceptions, lifecycle
from migrateflow.db import sqlite
from migrateflow.states import PowerState

BUSY_TIMEOUT_S = 30.0
HANG_POLL_S = 0.02
HANG_CAP_S = 600.0
INSTANCES_DIR = "/var/lib/migrateflow/instances"
BRIDGE = "br-int"
RUNNING, PAUSED = PowerState.RUNNING.value, PowerState.PAUSED.value
SHUTDOWN = PowerState.SHUTDOWN.value

#: Tables (untyped SQLite columns; this module is their only writer).
_SCHEMA = (
    "hosts (name TEXT PRIMARY KEY, hypervisor_type, hypervisor_version, cpu_model,"
    " cpu_features, memory_mb, disk_gb, shared_storage, link_mbps, up)",
    "guests (host, uuid, name, state, persistent, memory_mb, disk_gb, vcpus,"
    " dirty_rate_mbps, PRIMARY KEY (host, uuid))",
    "files (location, path, instance, disk_gb, PRIMARY KEY (location, path))",
    "vifs (host, port_id, instance, device, bridge, PRIMARY KEY (host, port_id))",
    "volume_connections (host, volume_id, instance, PRIMARY KEY (host, volume_id))",
    "jobs (instance TEXT PRIMARY KEY, source, dest, status, error, sim)",
    "counters (method, host, instance, n, PRIMARY KEY (method, host, instance))",
    "faults (id INTEGER PRIMARY KEY AUTOINCREMENT, method, action, host, instance,"
    " remaining, phase, message)",
    "timeline (id INTEGER PRIMARY KEY AUTOINCREMENT, time, event, host, instance)",
    "markers (key TEXT PRIMARY KEY, value)",
)
TABLES = tuple(table.split()[0] for table in _SCHEMA)
#: get_host_info's sums (a host's guests, a storage's files) read from these alone
_INDEXES = ("guests_usage ON guests (host, state, memory_mb)",
            "files_usage ON files (location, disk_gb)")
#: Connections a forked child inherited; closing them could disturb the parent.
_INHERITED = []


class StateStore:
    """One SQLite file; one connection per thread (and per process after fork)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._local = threading.local()
        self._enable_wal()
        with self.transaction() as db:
            for table in _SCHEMA:
                db.execute(f"CREATE TABLE IF NOT EXISTS {table}")
            for index in _INDEXES:
                db.execute(f"CREATE INDEX IF NOT EXISTS {index}")

    def _enable_wal(self):
        """WAL lets readers run beside the writer; switching needs a moment
        without other connections, so retry while another process opens it."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._connection().execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                lifecycle.sleep(0.01)

    def _connection(self):
        """A connection made in this thread of this process: sqlite3 objects
        must not cross threads, nor survive a fork into the child."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            if hasattr(local, "conn"):   # inherited through fork: never close it here
                _INHERITED.append(local.conn)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA synchronous = OFF")
            local.conn, local.pid = conn, os.getpid()
        return local.conn

    @contextlib.contextmanager
    def transaction(self, write=True):
        """One transaction; ``write`` takes the write lock up front (queued
        behind this process's other writers first: ``db.sqlite``)."""
        db = self._connection()
        held = sqlite.take_writer_lock(self.path) if write else None
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            if held is not None:
                held.release()

    def faults_armed(self):
        """Whether any fault is armed: a lock-free read, so the hook around
        every driver call takes the write lock only when one may fire (a
        fault armed after this read missed this call, as if armed later)."""
        db = self._connection()
        return db.execute("SELECT 1 FROM faults WHERE remaining != 0 LIMIT 1"
                          ).fetchone() is not None

    def reset(self):
        """Forget every host, guest, job, fault, counter and event."""
        with self.transaction() as db:
            for table in TABLES:
                db.execute(f"DELETE FROM {table}")


# -- bookkeeping shared by every operation ------------------------------------

def record_event(db, event, host, instance):
    """Append to the timeline; times never go backwards across processes."""
    db.execute("INSERT INTO timeline (time, event, host, instance) SELECT max(?, COALESCE("
               "(SELECT time FROM timeline ORDER BY id DESC LIMIT 1), 0.0)), ?, ?, ?",
               (time.time(), event, host, instance))


def record_change(db, method, host, instance):
    """Count one real side effect of ``method`` and put it on the timeline."""
    db.execute(
        "INSERT INTO counters VALUES (?, ?, ?, 1) ON CONFLICT (method, host, instance) "
        "DO UPDATE SET n = n + 1", (method, host, instance or ""))
    record_event(db, method, host, instance)


def bump_marker(db, key):
    """Signal waiters in any process (hangs poll these)."""
    db.execute("INSERT INTO markers VALUES (?, 1) ON CONFLICT (key) "
               "DO UPDATE SET value = value + 1", (key,))


def read_markers(db, keys):
    return tuple(
        (db.execute("SELECT value FROM markers WHERE key = ?", (key,)).fetchone()
         or (0,))[0] for key in keys)


# -- injected faults --------------------------------------------------------------

def take_fault(db, method, host, instance, phase):
    """The oldest armed fault matching the call, with one firing used up."""
    fault = db.execute(
        "SELECT * FROM faults WHERE method = ? AND phase = ? AND remaining != 0 "
        "AND (host IS NULL OR host = ?) AND (instance IS NULL OR instance = ?) "
        "ORDER BY id LIMIT 1", (method, phase, host, instance)).fetchone()
    if fault is not None and fault["remaining"] > 0:
        db.execute("UPDATE faults SET remaining = remaining - 1 WHERE id = ?",
                   (fault["id"],))
    return fault


def fire_fault(store, method, host, uuid, when, armed=None):
    """Fire the fault injected for this call, if any.

    raise: InjectedFault.  kill: SIGKILL to this very process.  hang: block
    until released, then InjectedFault -- except on get_migration_job, where
    a hang means the job stops progressing: returns "stall".  ``armed``:
    False when the caller found no fault armed at the call's start (then
    one armed during the call counts as armed after it).
    """
    if armed is False or (armed is None and not store.faults_armed()):
        return None
    with store.transaction() as db:
        fault = take_fault(db, method, host, uuid, when)
    if fault is None:
        return None
    message = fault["message"] or f"injected fault in {method} on {host}"
    if fault["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault["action"] == "hang":
        if method == "get_migration_job":
            return "stall"
        outcome = "hang released" if _wait_for_release(store, uuid) else "hang timed out"
        raise exceptions.InjectedFault(f"{message}: {outcome}")
    raise exceptions.InjectedFault(message)


def _wait_for_release(store, uuid):
    """Poll until release_hangs() or an abort of the instance's job in any
    process bumps a marker; False when HANG_CAP_S ran out first."""
    keys = ("release", f"abort:{uuid}")
    with store.transaction(write=False) as db:
        start = read_markers(db, keys)
    deadline = time.monotonic() + HANG_CAP_S
    while time.monotonic() < deadline:
        lifecycle.sleep(HANG_POLL_S)
        with store.transaction(write=False) as db:
            if read_markers(db, keys) != start:
                return True
    return False


# -- hypervisor rows: helpers take the open transaction; mutators return
#    True when they changed something (that is what the counters count)

def get_host(db, name):
    """The host's row; a contract call addressed to a down host fails."""
    row = db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise exceptions.HostNotFound(name)
    if not row["up"]:
        raise exceptions.DriverError(f"host {name} is unreachable")
    return row


def storage_of(host):
    """Where a host's instance files live (host row): its shared group or itself."""
    if host["shared_storage"]:
        return f"shared:{host['shared_storage']}"
    return f"host:{host['name']}"


def instance_dir(uuid):
    return f"{INSTANCES_DIR}/{uuid}"


def get_guest(db, host, uuid):
    return db.execute("SELECT * FROM guests WHERE host = ? AND uuid = ?",
                      (host, uuid)).fetchone()


def set_guest(db, host, uuid, **columns):
    assignments = ", ".join(f"{name} = ?" for name in columns)
    mismatch = " OR ".join(f"{name} IS NOT ?" for name in columns)
    values = tuple(columns.values())
    return db.execute(f"UPDATE guests SET {assignments} WHERE host = ? AND uuid = ? "
                      f"AND ({mismatch})", values + (host, uuid) + values).rowcount > 0


def define_guest(db, host, spec, state, persistent):
    """Define a guest from ``spec`` (a guest row or an instance dict)."""
    db.execute("INSERT INTO guests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (host, spec["uuid"], spec["name"], state, int(persistent),
                spec["memory_mb"], spec.get("disk_gb") or 0, spec["vcpus"],
                spec.get("dirty_rate_mbps") or 0.0))


def delete(db, table, where, params):
    return db.execute(f"DELETE FROM {table} WHERE {where}", params).rowcount > 0


def remove_guest(db, host, uuid):
    return delete(db, "guests", "host = ? AND uuid = ?", (host, uuid))


def ensure_file(db, location, path, uuid, disk_gb):
    return db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?)",
                      (location, path, uuid, disk_gb)).rowcount > 0


def file_row(db, location, path):
    return db.execute("SELECT * FROM files WHERE location = ? AND path = ?",
                      (location, path)).fetchone()


def plug_vifs(db, host, uuid, network_info):
    changed = False
    for vif in network_info or ():
        port = vif["port_id"]
        changed |= db.execute("INSERT OR IGNORE INTO vifs VALUES (?, ?, ?, ?, ?)",
                              (host, port, uuid, f"tap{port[:11]}", BRIDGE)).rowcount > 0
    return changed


def connect_volumes(db, host, uuid, block_device_info):
    changed = False
    for bdm in block_device_info or ():
        changed |= db.execute("INSERT OR IGNORE INTO volume_connections VALUES (?, ?, ?)",
                              (host, bdm["volume_id"], uuid)).rowcount > 0
    return changed


def release_host_resources(db, host, uuid):
    """Unplug the guest's VIFs and disconnect its volumes on ``host``."""
    unplugged = delete(db, "vifs", "host = ? AND instance = ?", (host, uuid))
    disconnected = delete(db, "volume_connections", "host = ? AND instance = ?",
                          (host, uuid))
    return unplugged or disconnected


def drop_instance_dir(db, host, uuid):
    """Remove the instance directory from the storage of ``host`` (row)
    unless a guest defined on a host sharing that storage still needs it."""
    where = storage_of(host)
    users = db.execute("SELECT h.* FROM guests g JOIN hosts h ON h.name = g.host "
                       "WHERE g.uuid = ?", (uuid,)).fetchall()
    if any(storage_of(user) == where for user in users):
        return False
    return delete(db, "files", "location = ? AND path = ?", (where, instance_dir(uuid)))


def hosts_defining(db, uuid, other_than=None):
    """Names of the hosts where the guest is defined (but ``other_than``)."""
    rows = db.execute("SELECT host FROM guests WHERE uuid = ? AND host IS NOT ? "
                      "ORDER BY host", (uuid, other_than))
    return [row["host"] for row in rows]


def flavor_columns(flavor):
    """The guest columns a flavor sets."""
    return {"memory_mb": flavor["memory_mb"], "vcpus": flavor["vcpus"],
            "disk_gb": flavor.get("disk_gb") or 0}


def host_info(db, row):
    """get_host_info of a host row: free memory and disk from what is defined."""
    used_memory = db.execute("SELECT COALESCE(SUM(memory_mb), 0) FROM guests WHERE host = ? "
                             "AND state != ?", (row["name"], PowerState.SHUTDOWN.value)
                             ).fetchone()[0]
    used_disk = db.execute("SELECT COALESCE(SUM(disk_gb), 0) FROM files WHERE location = ?",
                           (storage_of(row),)).fetchone()[0]
    return {
        "hypervisor_type": row["hypervisor_type"],
        "hypervisor_version": row["hypervisor_version"],
        "cpu_model": row["cpu_model"], "cpu_features": json.loads(row["cpu_features"]),
        "memory_mb": row["memory_mb"], "memory_free_mb": row["memory_mb"] - used_memory,
        "disk_gb": row["disk_gb"], "disk_free_gb": row["disk_gb"] - used_disk,
    }


def hooked(method):
    """Run the fault hook around a contract method; its first argument is
    the host it is addressed to, ``instance``/``instance_uuid`` the guest."""
    signature = inspect.signature(method)
    names = list(signature.parameters)[1:]  # after self
    where = {name: names.index(name) for name in ("instance_uuid", "instance")
             if name in names}

    def arg(args, kwargs, name):
        position = where.get(name)
        if position is None:
            return None
        return args[position] if position < len(args) else kwargs.get(name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if args:  # the usual call: no signature binding (it costs more than the fault check)
            host = args[0]
            uuid = arg(args, kwargs, "instance_uuid") or (
                arg(args, kwargs, "instance") or {}).get("uuid")
        else:
            arguments = signature.bind(self, *args, **kwargs).arguments
            host = list(arguments.values())[1]
            uuid = arguments.get("instance_uuid") or (
                arguments.get("instance") or {}).get("uuid")
        armed = self._store.faults_armed()
        fire_fault(self._store, method.__name__, host, uuid, "before", armed)
        result = method(self, *args, **kwargs)
        fire_fault(self._store, method.__name__, host, uuid, "after", armed)
        return result
    return call


def probe_path(instance_uuid, purpose=None):
    """The shared-storage probe of an instance's check (one per instance and
    purpose, so a repeated check or a cleanup without the check's reply finds
    it, and the cold-migration probe never removes a live-migration one)."""
    if purpose:
        return f"{INSTANCES_DIR}/probe-{purpose}-{instance_uuid}"
    return f"{INSTANCES_DIR}/probe-{instance_uuid}"


def clear_guest(db, host_row, uuid, drop_disk):
    """Undefine the guest on the host, give its resources back and, with
    ``drop_disk``, remove its instance directory; True if anything changed."""
    changed = remove_guest(db, host_row["name"], uuid)
    changed |= release_host_resources(db, host_row["name"], uuid)
    if drop_disk:
        changed |= drop_instance_dir(db, host_row, uuid)
    return changed


def attach_guest(db, host, uuid, block_device_info, network_info):
    """Connect the guest's volumes and plug its VIFs on ``host``; True if
    anything changed (the counterpart of ``release_host_resources``)."""
    changed = connect_volumes(db, host, uuid, block_device_info)
    changed |= plug_vifs(db, host, uuid, network_info)
    return changed
