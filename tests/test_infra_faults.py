"""Infrastructure faults in the middle of a flow run by a conductor: the
ZooKeeper server restarted, the conductor's ZooKeeper session expired, the
database connections dropped.  Each migration still completes, exactly
once (the fake hypervisor counts every side effect)."""
import threading
import time

import pytest
import sqlalchemy as sa

import servers
from helpers import snapshot, wait_until
from migrateflow import api, engine, service
from migrateflow.db import api as db_api
from test_sql_servers import scratch_database


@pytest.fixture
def jobboard(zk_conf):
    zk_conf.set_override("enabled", True, group="jobboard")
    # the copy is stalled by a fault for a while: do not spin
    zk_conf.set_override("live_migration_poll_interval", 0.01, group="migration")
    yield zk_conf
    zk_conf.clear_override("enabled", group="jobboard")


class Conductor:
    """The product conductor, in a thread of this process."""

    def __init__(self):
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=service.run_conductor,
            kwargs={"stop_event": self.stop_event, "sweep": False}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "conductor did not stop"


def _stall_copy(driver, inst_uuid):
    """The memory copy makes no progress until the fault is cleared."""
    driver.inject_fault("get_migration_job", action="hang", instance=inst_uuid, count=-1)


def _assert_moved_once(db, driver, inst_uuid, dest):
    got = db.get_instance(inst_uuid)
    assert (got["host"], got["task_state"], got["vm_state"]) == (dest, None, "active")
    assert [g["uuid"] for g in driver.guests(dest)] == [inst_uuid]
    repeated = {k: n for k, n in driver.side_effects(inst_uuid).items() if n > 1}
    assert repeated == {}, f"side effects applied more than once: {repeated}"
    assert db.list_claims() == []


def _run_stalled(db, driver, inst_uuid, during_stall):
    """Start a migration on a conductor, stall its copy, apply the fault,
    let the copy go on; returns the final record."""
    client = api.MigrationAPI()
    _stall_copy(driver, inst_uuid)
    with Conductor():
        mig = client.live_migrate(inst_uuid, "host-b", wait=False)
        wait_until(lambda: db.get_migration(mig["uuid"])["status"] == "running",
                    what="the copy to start")
        during_stall()
        driver.clear_faults()
        mig = client.wait(mig["uuid"], timeout=60)
        wait_until(lambda: engine.get_board().job_count == 0, what="the job to be consumed")
    return mig


def test_zookeeper_restart_mid_flow(zk_private_server, jobboard, small_cloud, db, driver):
    jobboard.set_override("hosts", [zk_private_server.hosts], group="jobboard")
    inst = small_cloud["instance"]

    def outage():
        zk_private_server.stop()
        time.sleep(3.0)  # longer than the 2 s session timeout
        zk_private_server.start()

    mig = _run_stalled(db, driver, inst["uuid"], outage)
    assert mig["status"] == "completed", mig["error"]
    _assert_moved_once(db, driver, inst["uuid"], "host-b")


def test_conductor_session_expired_mid_flow(zk_server, jobboard, small_cloud, db, driver):
    inst = small_cloud["instance"]

    def expire():
        board_client = engine.get_board()._client  # the conductor's own session
        servers.expire_session(zk_server.hosts, board_client)

    mig = _run_stalled(db, driver, inst["uuid"], expire)
    assert mig["status"] == "completed", mig["error"]
    _assert_moved_once(db, driver, inst["uuid"], "host-b")


def _drop_connections(kind, url):
    """Kill every server-side connection to the test database but ours."""
    name = sa.engine.make_url(url).database
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if kind == "postgresql":
                killed = conn.exec_driver_sql(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()").scalar()
            else:
                ids = [r[0] for r in conn.exec_driver_sql(
                    "SELECT id FROM information_schema.processlist "
                    f"WHERE db = '{name}' AND id <> CONNECTION_ID()")]
                for ident in ids:
                    conn.exec_driver_sql(f"KILL CONNECTION {ident}")
                killed = len(ids)
    finally:
        admin.dispose()
    assert killed > 0, "the flow held no database connection to drop"


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_database_connections_dropped_mid_flow(kind, jobboard, db, driver):
    """State database and flow persistence on a SQL server (opportunistic:
    skipped, saying why, when the server is not reachable)."""
    from migrateflow import cloud
    with scratch_database(kind) as url:
        jobboard.set_override("connection", url, group="database")
        sql_db = db_api.get_db(jobboard)
        for name in ("host-a", "host-b"):
            cloud.add_host(sql_db, driver, name, shared_storage="nfs-1")
        inst = cloud.add_instance(sql_db, driver, "vm-1", "host-a", volumes=1)
        before = snapshot(sql_db, driver, inst["uuid"], hosts=("host-a", "host-b"))
        mig = _run_stalled(sql_db, driver, inst["uuid"],
                           lambda: _drop_connections(kind, url))
        assert mig["status"] == "completed", mig["error"]
        _assert_moved_once(sql_db, driver, inst["uuid"], "host-b")
        assert before["instance"]["host"] == "host-a"
        engine.reset()
