"""The step a migration runs, in its record (``current_step``): written at
once for the first step of a run and for reverts, late for a step that
lasts, never over the end of the migration.  A trigger in the test's own
(real) state database logs every change of the column."""
import threading
import time

import taskflow.engines
from taskflow import states as tf_states
from taskflow import task
from taskflow.patterns import linear_flow

from migrateflow import api, flow_events, hostops
from migrateflow.flows import live_migration

from test_host_drain import TIME_SCALE, _assert_drained, _cloud, waiting_at_the_gate


def _log_steps(db):
    with db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE step_log (id INTEGER PRIMARY KEY, uuid TEXT, "
                             "step TEXT)")
        conn.exec_driver_sql(
            "CREATE TRIGGER log_step AFTER UPDATE OF current_step ON migrations "
            "WHEN NEW.current_step IS NOT OLD.current_step BEGIN "
            "INSERT INTO step_log (uuid, step) VALUES (NEW.uuid, NEW.current_step); END")


def _steps(db, uuid):
    with db.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT step FROM step_log WHERE uuid = ? ORDER BY id", (uuid,))]


def _flow_steps():
    names = []

    def walk(flow):
        for node, _meta in flow.iter_nodes():
            if isinstance(node, linear_flow.Flow):
                walk(node)
            else:
                names.append(node.name)
    walk(live_migration.build())
    return names


def _in_flow_order(logged):
    order = _flow_steps()
    positions = [order.index(step) for step in logged]
    return positions == sorted(positions)


def test_a_step_that_lasts_is_recorded_and_short_ones_are_not_written(db, driver,
                                                                       small_cloud):
    _log_steps(db)
    inst = small_cloud["instance"]
    with waiting_at_the_gate(db, inst["uuid"], "host-b") as (client, mig):
        pass  # the step lasted: the record named it
    mig = client.wait(mig["uuid"], timeout=30)
    assert mig["status"] == "completed", mig["error"]
    time.sleep(3 * flow_events.STEP_RECORD_DELAY_S)  # any late write came by now
    logged = _steps(db, mig["uuid"])
    assert logged[0] == "start-live-migration" and logged[-1] is None
    assert "live-migration" in logged and _in_flow_order(logged[:-1])
    # the flow ran every one of its steps; the short ones were not written
    assert len(logged) - 1 < len(_flow_steps())
    assert db.get_migration(mig["uuid"])["current_step"] is None
    assert [g["uuid"] for g in driver.guests("host-b")] == [inst["uuid"]]


def test_a_late_write_never_lands_after_the_migration_ended(monkeypatch, db, small_cloud):
    # every step after the first is short beside this delay: a late write
    # is still queued when the flow ends
    monkeypatch.setattr(flow_events, "STEP_RECORD_DELAY_S", 0.5)
    _log_steps(db)
    started = time.monotonic()
    mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    took = time.monotonic() - started
    assert mig["status"] == "completed", mig["error"]
    time.sleep(1.0)
    assert db.get_migration(mig["uuid"])["current_step"] is None
    logged = _steps(db, mig["uuid"])
    assert logged[-1] is None and logged[0] == "start-live-migration"
    if took < 0.5:  # a fast machine: nothing was due before the end
        assert logged == ["start-live-migration", None]


class _Noop(task.Task):
    def execute(self):
        return None


class _BlockedDB:
    """Stands in for the state database while another process holds its
    write lock (a test double: the late write waits until released)."""

    def __init__(self, real):
        self.real, self.release, self.entered = real, threading.Event(), threading.Event()

    def replace_current_step(self, *args):
        self.entered.set()
        assert self.release.wait(10)
        return self.real.replace_current_step(*args)

    def update_migration(self, *args, **kwargs):
        return self.real.update_migration(*args, **kwargs)


def test_a_late_write_waiting_for_the_database_does_not_hold_the_flow(db, small_cloud):
    mig = db.start_migration(small_cloud["instance"]["uuid"], migration_type="live-migration",
                             task_state="migrating", source_host="host-a")
    engine = taskflow.engines.load(linear_flow.Flow("f").add(_Noop(name="n")))
    mirror = flow_events.StepMirror(engine, mig["uuid"])
    blocked = mirror._db = _BlockedDB(db)
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "first"})  # at once
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "second"})  # late
    writer = threading.Thread(target=mirror.write_late, daemon=True)
    writer.start()
    assert blocked.entered.wait(10)
    # the flow goes on while the late write waits: more steps, a revert
    flow = threading.Thread(target=lambda: (
        mirror._task_receiver(tf_states.RUNNING, {"task_name": "third"}),
        mirror._task_receiver(tf_states.REVERTING, {"task_name": "third"})), daemon=True)
    flow.start()
    flow.join(5)
    alive = flow.is_alive()
    blocked.release.set()
    writer.join(10)
    assert not alive, "the flow's thread waited for the late write"
    # the revert, written at once, is not overwritten by the late write
    assert db.get_migration(mig["uuid"])["current_step"] == "revert:third"
    mirror.write_late()
    assert db.get_migration(mig["uuid"])["current_step"] == "revert:third"
    # nor does that conflict stop the late writes (a retried block runs again)
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "third"})
    mirror.write_late()
    assert db.get_migration(mig["uuid"])["current_step"] == "third"
    # a record moved on by someone else (the migration ended) is left alone
    db.update_migration(mig["uuid"], current_step=None)
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "fourth"})
    mirror.write_late()
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "fifth"})
    mirror.write_late()
    assert db.get_migration(mig["uuid"])["current_step"] is None


def test_drain_workers_write_the_steps_that_last(conf, db, driver):
    # worker processes forked from this one write late too: one copy at
    # a time of about 150 ms, so every migration waits at the gate or copies
    conf.set_override("time_scale", 2.5 * TIME_SCALE, group="fake_driver")
    instances = _cloud(db, driver, ["host-a"], 4)["host-a"]
    _log_steps(db)
    report = hostops.drain_host(api.MigrationAPI(), "host-a", per_host_limit=1, processes=2)
    _assert_drained(db, driver, "host-a", instances, report)
    time.sleep(3 * flow_events.STEP_RECORD_DELAY_S)
    for result in report["results"]:
        logged = _steps(db, result["migration"])
        assert "live-migration" in logged and logged[-1] is None, logged
        assert _in_flow_order(logged[:-1]), logged


class _Idle:
    def write_late(self):
        return None


def _child_writes_late(uuid, code):
    from migrateflow.db import api as db_api
    db = db_api.get_db()
    engine = taskflow.engines.load(linear_flow.Flow("f").add(_Noop(name="n")))
    mirror = flow_events.StepMirror(engine, uuid)
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "first"})
    mirror._task_receiver(tf_states.RUNNING, {"task_name": "second"})
    deadline = time.monotonic() + 10
    while db.get_migration(uuid)["current_step"] != "second":
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    code.value = 7


def test_a_child_forked_while_late_writes_wait_writes_its_own(db, small_cloud):
    import multiprocessing
    mig = db.start_migration(small_cloud["instance"]["uuid"], migration_type="live-migration",
                             task_state="migrating", source_host="host-a")
    flow_events._LATE.add(time.monotonic() + 1.0, _Idle())  # this process's thread waits
    code = multiprocessing.Value("i", 0)
    child = multiprocessing.get_context("fork").Process(target=_child_writes_late,
                                                        args=(mig["uuid"], code))
    child.start()
    child.join(20)
    assert child.exitcode == 0 and code.value == 7
    assert db.get_migration(mig["uuid"])["current_step"] == "second"
    assert flow_events.late_writes_idle(5)
