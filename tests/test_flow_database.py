"""Where flows are persisted, and what happens when they cannot be.

Real SQLite files; nothing mocked.
"""
import contextlib
import sqlite3

import pytest

from migrateflow import api, engine
from tests.helpers import snapshot


def _flow_rows(path):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT count(*) FROM tf_flowdetails").fetchone()[0]


def test_embedded_default_keeps_flows_in_a_file_beside_the_state(conf, db, small_cloud,
                                                                 tmp_path):
    mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    assert mig["status"] == "completed", mig["error"]
    assert engine.persistence_url(conf) == f"sqlite:///{tmp_path}/state.flows.sqlite"
    assert _flow_rows(tmp_path / "state.flows.sqlite") == 1
    assert _flow_rows(tmp_path / "state.sqlite") == 0  # the state file has none
    engine.reset()  # another process would find the flow there
    with contextlib.closing(engine.get_backend().get_connection()) as conn:
        assert conn.get_flow_details(mig["flow_uuid"]).state == "SUCCESS"


def test_a_configured_flow_database_gets_its_tables(conf, db, small_cloud, tmp_path):
    conf.set_override("connection", f"sqlite:///{tmp_path}/elsewhere.sqlite",
                      group="persistence")
    try:
        mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    finally:
        conf.clear_override("connection", group="persistence")
    assert mig["status"] == "completed", mig["error"]
    assert _flow_rows(tmp_path / "elsewhere.sqlite") == 1
    assert not (tmp_path / "state.flows.sqlite").exists()


@pytest.mark.parametrize("operation, status", [("live_migrate", "failed"),
                                               ("migrate", "error")])
def test_a_flow_that_cannot_be_persisted_fails_at_once_and_changes_nothing(
        conf, db, driver, small_cloud, tmp_path, operation, status):
    uuid = small_cloud["instance"]["uuid"]
    before = snapshot(db, driver, uuid)
    # a directory that does not exist: SQLite cannot open the flow database
    conf.set_override("connection", f"sqlite:///{tmp_path}/missing/flows.sqlite",
                      group="persistence")
    try:
        mig = getattr(api.MigrationAPI(), operation)(uuid, "host-b")
    finally:
        conf.clear_override("connection", group="persistence")
    assert mig["status"] == status  # each kind's end for "nothing ran"
    assert "not started: its flow could not be persisted" in mig["error"]
    assert mig["current_step"] is None and mig["flow_uuid"] is None
    assert snapshot(db, driver, uuid) == before  # the instance is released, as it was
    assert db.list_quota_reservations() == []
    # and the next request goes through
    assert api.MigrationAPI().live_migrate(uuid, "host-b")["status"] == "completed"
