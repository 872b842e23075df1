"""The state database and flow persistence on PostgreSQL and MariaDB.

Opportunistic, as oslo.db's own tests are: each server is used when it
answers on loopback (it does on this machine kind) and the test is skipped,
saying why, when it does not.  SQLite runs in every other test.
"""
import contextlib
import uuid

import pytest
import sqlalchemy as sa

from helpers import snapshot
from migrateflow import api, cloud, drivers, engine
from migrateflow.db import api as db_api

SERVERS = {
    "postgresql": "postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/{db}",
}
ADMIN_DB = {"postgresql": "postgres", "mariadb": "mysql"}


@contextlib.contextmanager
def scratch_database(kind):
    """A new, empty database on the server, dropped afterwards."""
    name = "mf_test_" + uuid.uuid4().hex[:12]
    admin_url = SERVERS[kind].format(db=ADMIN_DB[kind])
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
        pytest.skip(f"{kind} not reachable on loopback: {type(err).__name__}: {err}")
    url = SERVERS[kind].format(db=name)
    try:
        yield url
    finally:
        db_api.forget_db(url)
        engine.reset()
        with admin.connect() as conn:
            if kind == "postgresql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


@pytest.fixture(params=sorted(SERVERS))
def server_conf(request, conf):
    with scratch_database(request.param) as url:
        conf.set_override("connection", url, group="database")
        yield conf


def test_live_migration_and_rollback_on_sql_server(server_conf):
    db, driver = db_api.get_db(server_conf), drivers.get_driver(server_conf)
    for name in ("host-a", "host-b", "host-c"):
        cloud.add_host(db, driver, name, shared_storage="nfs-1" if name != "host-c" else None)
    inst = cloud.add_instance(db, driver, "vm-1", "host-a", ports=2, volumes=1)
    client = api.MigrationAPI()

    before = snapshot(db, driver, inst["uuid"])
    driver.inject_fault("pre_live_migration", instance=inst["uuid"], when="after")
    failed = client.live_migrate(inst["uuid"], "host-c")
    assert failed["status"] == "failed" and "pre-live-migration" in failed["error"]
    assert snapshot(db, driver, inst["uuid"]) == before

    done = client.live_migrate(inst["uuid"], "host-b")
    assert done["status"] == "completed"
    moved = db.get_instance(inst["uuid"])
    assert (moved["host"], moved["task_state"]) == ("host-b", None)
    assert {b["host"] for b in db.list_port_bindings(inst["uuid"])} == {"host-b"}
    assert db.list_claims() == []
    # the flow details went to the same server
    with contextlib.closing(engine.get_backend().get_connection()) as conn:
        assert conn.get_flow_details(done["flow_uuid"]).state == "SUCCESS"


def test_the_step_is_replaced_only_while_expected_on_sql_server(server_conf):
    """The late step write (flow_events.StepMirror) through SQLAlchemy."""
    db, driver = db_api.get_db(server_conf), drivers.get_driver(server_conf)
    cloud.add_host(db, driver, "host-a")
    inst = cloud.add_instance(db, driver, "vm-1", "host-a")
    mig = db.start_migration(inst["uuid"], migration_type="live-migration",
                             task_state="migrating", source_host="host-a")
    assert db.update_migration(mig["uuid"], current_step="first")
    assert not db.replace_current_step(mig["uuid"], "other", "second")
    assert db.get_migration(mig["uuid"])["current_step"] == "first"
    assert db.replace_current_step(mig["uuid"], "first", "second")
    assert db.get_migration(mig["uuid"])["current_step"] == "second"
    assert db.update_migration(mig["uuid"], current_step=None)
    assert not db.replace_current_step(mig["uuid"], "second", "third")
    assert db.get_migration(mig["uuid"])["current_step"] is None
