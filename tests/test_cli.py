"""The ``migrateflow`` command, run in-process against the fixtures'
SQLite database and fake hypervisors (no mocks): each call parses its own
argv, and nothing it sets outlives the call."""
import re

import pytest

from migrateflow import cli, graph
from migrateflow.flows import live_migration

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def test_host_list(run, small_cloud):
    code, out, err = run("host-list")
    assert code == 0, err
    for name in ("host-a", "host-b", "host-c"):
        assert name in out
    assert "QEMU 7.2.0" in out and "nfs-1" in out and "2048/65536" in out


def test_instance_list(run, small_cloud):
    uuid = small_cloud["instance"]["uuid"]
    code, out, _ = run("instance-list")
    assert code == 0 and uuid in out and "vm-1" in out and "active" in out
    code, out, _ = run("instance-list", "--host", "host-b")
    assert code == 0 and uuid not in out


def test_live_migrate_to_a_host(run, small_cloud, db):
    uuid = small_cloud["instance"]["uuid"]
    code, out, err = run("live-migrate", uuid, "--host", "host-b")
    assert code == 0, out + err
    assert re.search(r"^completed step=- memory=\d+/2048 MiB", out, re.M)  # plain progress
    assert "completed: instance" in out and "runs on host-b" in out
    inst = db.get_instance(uuid)
    assert (inst["host"], inst["task_state"], inst["vm_state"]) == ("host-b", None, "active")
    assert {b["host"] for b in db.list_port_bindings(instance_uuid=uuid)} == {"host-b"}
    assert {c["host"] for c in db.list_volume_connections(instance_uuid=uuid)} == {"host-b"}


def test_live_migrate_failure_exits_1(run, small_cloud, db, driver):
    uuid = small_cloud["instance"]["uuid"]
    driver.inject_fault("pre_live_migration", host="host-b")
    code, out, err = run("live-migrate", uuid, "--host", "host-b")
    assert code == 1
    assert "failed: pre-live-migration" in err and "injected fault" in err
    assert db.get_instance(uuid)["host"] == "host-a"


@pytest.mark.parametrize("argv, message", [
    (["--host", "nowhere"], "error: host 'nowhere' not found"),
    (["--host", "host-a"], "error: destination host-a is the instance's current host"),
    (["--host", "host-b", "--block-migrate"], "error: block migration requested but"),
])
def test_live_migrate_refused_changes_nothing(run, small_cloud, db, argv, message):
    uuid = small_cloud["instance"]["uuid"]
    before = db.get_instance(uuid)
    code, out, err = run("live-migrate", uuid, *argv)
    assert code == 2
    assert err.startswith(message) and "Traceback" not in err
    assert db.get_instance(uuid) == before
    assert db.list_migrations() == [] and db.list_claims() == []


def test_live_migrate_unknown_instance_and_bad_flags(run, small_cloud):
    code, _, err = run("live-migrate", "no-such-instance")
    assert code == 2 and err.strip() == "error: instance 'no-such-instance' not found"
    code, _, err = run("live-migrate", "x", "--block-migrate", "--no-block-migrate")
    assert code == 2 and "not allowed with argument" in err


def test_migration_list_and_show(run, small_cloud):
    uuid = small_cloud["instance"]["uuid"]
    assert run("live-migrate", uuid, "--host", "host-c")[0] == 0
    code, out, _ = run("migration-list", "--instance", uuid)
    migration_id = re.search(rf"^│ ({UUID})", out, re.M).group(1)
    assert code == 0 and "completed" in out and "host-a → host-c" in out
    code, out, _ = run("migration-list", "--status", "failed")
    assert code == 0 and migration_id not in out
    code, out, err = run("migration-show", migration_id)
    assert code == 0, err
    assert "flow_uuid" in out and "completed" in out
    names = graph.execution_order(graph.describe(live_migration.build()))
    steps = out[out.index("Flow steps"):]
    positions = [steps.index(f"│ {name} ") for name in names]
    assert positions == sorted(positions)  # the flow's atoms, in flow order
    assert len(re.findall(r"│ SUCCESS ", steps)) == len(names)


def test_operator_commands_refuse_clearly(run, small_cloud):
    code, _, err = run("migration-show", "nope")
    assert code == 2 and err.strip() == "error: migration 'nope' not found"
    uuid = small_cloud["instance"]["uuid"]
    run("live-migrate", uuid, "--host", "host-b")
    migration_id = re.search(UUID, run("migration-list")[1]).group(0)
    for command in ("migration-abort", "migration-force-complete"):
        code, _, err = run(command, migration_id)
        assert code == 2 and "completed" in err and "Traceback" not in err


@pytest.mark.parametrize("kind, marker", [("activity", "repeat while"),
                                          ("sequence", 'database "State DB"')])
def test_graph(run, kind, marker):
    code, out, _ = run("graph", "live-migration", "--kind", kind)
    assert code == 0 and out.startswith("@startuml") and out.rstrip().endswith("@enduml")
    assert marker in out
    assert run("graph", "teleport")[0] == 2


def test_demo_runs_and_leaves_the_callers_configuration(run, small_cloud, tmp_path):
    code, out, err = run("demo", "--state-dir", str(tmp_path / "elsewhere"))
    assert code == 0, out + err
    assert "UNEXPECTED" not in out
    assert "status: failed" in out and "rollback, steps reverted in order: pre-live-migration" in out
    assert "refused: destination" in out and "the scheduler chose compute-3" in out
    assert (tmp_path / "elsewhere" / "demo" / "state.sqlite").exists()
    code, out, _ = run("host-list")  # the fixture's database again, not the demo's
    assert code == 0 and "host-a" in out and "compute-1" not in out
    code, out, _ = run("--state-dir", str(tmp_path / "elsewhere" / "demo"),
                       "--database-connection",
                       f"sqlite:///{tmp_path}/elsewhere/demo/state.sqlite", "host-list")
    assert code == 0 and "compute-4" in out


def test_database_password_is_never_printed(run, conf):
    code, out, err = run("--database-connection", "gar:bage:s3cret@nowhere", "host-list")
    assert code == 1 and "s3cret" not in out + err and "error: state database" in err
    assert cli.masked_url("postgresql://u:s3cret@db/x") == "postgresql://u:***@db/x"
    assert cli.scrub("to mysql+pymysql://u:s3cret@db/x failed") == (
        "to mysql+pymysql://u:***@db/x failed")
    assert conf.database.connection.startswith("sqlite:///")  # the override came back
