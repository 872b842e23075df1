"""The state database's statements that run straight on SQLite (each
thread's own sqlite3 connection, ``db.sqlite.raw_transaction``) do what
their SQLAlchemy path does (which PostgreSQL and MariaDB run, and SQLite
too when a file's connections are not ours): the same calls on two copies
of one database, one each way, give the same answers, the same errors and
the same rows in every table."""
import shutil

import pytest
import sqlalchemy as sa

from migrateflow import exceptions as exc
from migrateflow.conf import CONF
from migrateflow.db import api as db_api
from migrateflow.db import models as m
from migrateflow.db import sqlite as db_sqlite

INSTANCE = "11111111-2222-3333-4444-555555555555"
#: columns whose values are times, or made at random (normalised below)
_TIMES = {"created_at", "updated_at", "finished_at"}


def _world(db):
    for name, memory in (("h1", 8192), ("h2", 8192), ("small", 512)):
        db.create_host(name, hypervisor_type="fake", hypervisor_version=1, cpu_model="m",
                       vcpus=16, memory_mb=memory, disk_gb=100)
    db.create_instance(name="vm", host="h1", flavor_name="f", memory_mb=1024, vcpus=2,
                       disk_gb=10, volume_ids=["vol-a", "vol-b"], port_count=2,
                       uuid=INSTANCE)


def _scenario(db):
    """Every converted call, with the cases each must keep: idempotence,
    refusals, empty lists, lost compare-and-swaps.  Returns what each said."""
    said = []

    def call(name, *args, **kwargs):
        try:
            said.append((name, getattr(db, name)(*args, **kwargs)))
        except exc.MigrateflowError as err:
            said.append((name, type(err).__name__, str(err)))

    mig = db.start_migration(INSTANCE, migration_type="live-migration",
                             task_state="migrating", source_host="h1")["uuid"]
    start = dict(migration_type="live-migration", task_state="migrating", source_host="h1")
    call("start_migration", INSTANCE, **start)  # busy: the first holds it
    call("start_migration", "no-such-instance", **start)
    inst = db.get_instance(INSTANCE)
    ports = [p["id"] for p in db.list_ports(INSTANCE)]
    said.append(("list_ports", [(p["network_id"], p["mac"] is not None)
                                for p in db.list_ports(INSTANCE)]))
    said.append(("list_block_devices", [{k: v for k, v in d.items() if k not in _TIMES}
                                        for d in db.list_block_devices(INSTANCE)]))
    call("claim_resources", mig, inst, "h2")
    call("claim_resources", mig, inst, "h2")
    call("claim_resources", mig, inst, "small")
    call("claim_resources", mig, inst, "nowhere")
    call("add_port_bindings", ports, "h2", "INACTIVE", mig)
    call("add_port_bindings", ports, "h2", "INACTIVE", mig)
    call("add_port_bindings", [], "h2", "INACTIVE", mig)
    call("add_volume_connections", INSTANCE, ["vol-a", "vol-b"], "h2", mig)
    call("add_volume_connections", INSTANCE, ("vol-a",), "h2", mig)
    call("move_instance", mig, INSTANCE, "h1", "h2", power_state="running")
    call("move_instance", mig, INSTANCE, "h1", "h2", power_state="running")
    call("activate_port_bindings", ports, "h2")
    call("activate_port_bindings", ports, "h2")
    call("activate_port_bindings", [], "h2")
    call("delete_volume_connections", ["vol-a", "vol-b"], "h1")
    call("delete_volume_connections", [], "h1")
    call("update_instance", INSTANCE, vm_state="active")
    call("update_instance", "no-such-instance", vm_state="active")
    call("finish_migration", mig, INSTANCE, "completed", ["running"])
    call("finish_migration", mig, INSTANCE, "completed", ["queued"], error=None,
         instance_values={"vm_state": "active"})
    call("finish_migration", mig, INSTANCE, "error", ["queued"])
    call("start_migration", INSTANCE, **start)  # on h2 now
    said.append(("list_hosts", [{k: v for k, v in h.items() if k not in _TIMES}
                                for h in db.list_hosts()]))
    return said, {mig: "MIG", **{port: f"PORT-{i}" for i, port in enumerate(ports)}}


def _tables(db, names):
    """Every row of every table, times and MACs left out, random ids named."""
    dump = {}
    with db.engine.connect() as conn:
        for table in m.METADATA.sorted_tables:
            cols = [c for c in table.columns if c.name not in _TIMES | {"mac"}]
            dump[table.name] = sorted(
                tuple(names.get(v, v) for v in row)
                for row in conn.execute(sa.select(*cols)))
    return dump


def _rename(said, names):
    return [tuple(names.get(v, v) if isinstance(v, str) else v for v in entry)
            for entry in said]


@pytest.fixture
def two_copies(tmp_path, template_db, conf):
    dbs = []
    for name in ("raw", "sqlalchemy"):
        path = tmp_path / f"{name}.sqlite"
        shutil.copy(template_db, path)
        db = db_api.StateDB(f"sqlite:///{path}", CONF.persistence.sqlite_synchronous)
        _world(db)
        dbs.append(db)
    yield dbs
    for db in dbs:
        db_api.forget_db(db.url)


def test_raw_statements_do_what_sqlalchemys_do(two_copies, monkeypatch):
    raw_db, sa_db = two_copies
    taken = []
    real = db_sqlite.raw_transaction
    monkeypatch.setattr(db_sqlite, "raw_transaction",
                        lambda engine: taken.append(1) or real(engine))
    raw_said, raw_names = _scenario(raw_db)
    assert len(taken) >= 14, "the raw path was not taken"

    taken.clear()
    monkeypatch.setattr(db_sqlite, "raw_capable", lambda engine: False)
    sa_said, sa_names = _scenario(sa_db)
    assert not taken

    assert _rename(raw_said, raw_names) == _rename(sa_said, sa_names)
    assert _tables(raw_db, raw_names) == _tables(sa_db, sa_names)
    said = dict((entry[0], entry[1:]) for entry in raw_said)  # the last of each name
    assert said["finish_migration"] == (False,)  # already completed
    assert ("claim_resources", "InsufficientResources") in [e[:2] for e in raw_said]
    assert ("claim_resources", "HostNotFound") in [e[:2] for e in raw_said]
    assert [e[1] for e in raw_said if e[0] == "start_migration"] == [
        "InstanceBusy", "InstanceNotFound", "InstanceInvalidState"]


def test_instance_changes_go_through_sqlalchemy_while_announced(two_copies, monkeypatch):
    """``db.observe`` announces instance state changes from SQLAlchemy's
    UPDATEs: while it does, nothing that changes an instance goes raw."""
    raw_db, _ = two_copies
    monkeypatch.setattr(db_api.observe, "announcing", lambda: True)
    taken = []
    real = db_sqlite.raw_transaction
    monkeypatch.setattr(db_sqlite, "raw_transaction",
                        lambda engine: taken.append(1) or real(engine))
    raw_update = []
    monkeypatch.setattr(db_api.StateDB, "_raw_update", lambda self, table, *a, **k:
                        raw_update.append(table.name))
    mig = raw_db.start_migration(INSTANCE, migration_type="live-migration",
                                 task_state="migrating", source_host="h1")["uuid"]
    before = len(taken)
    assert raw_db.move_instance(mig, INSTANCE, "h1", "h2")
    assert raw_db.update_instance(INSTANCE, vm_state="active")
    assert raw_db.finish_migration(mig, INSTANCE, "completed", ["queued"])
    assert len(taken) == before and "instances" not in raw_update
    inst = raw_db.get_instance(INSTANCE)
    assert (inst["host"], inst["task_state"]) == ("h2", None)
