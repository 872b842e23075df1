"""The conductor process (``migrateflow conductor``) with a real ZooKeeper:
jobs run to completion, SIGTERM stops it cleanly without losing a flow, and
another conductor resumes what the stopped one left."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import conductor_config, wait_until
from migrateflow import api, engine


@pytest.fixture
def jobboard(zk_conf, tmp_path):
    zk_conf.set_override("enabled", True, group="jobboard")
    zk_conf.set_override("live_migration_poll_interval", 0.01, group="migration")
    yield zk_conf
    zk_conf.clear_override("enabled", group="jobboard")


def start_conductor(config, log_path):
    return subprocess.Popen(
        [sys.executable, "-m", "migrateflow.cli", "--config-file", config, "conductor"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def test_conductor_runs_posted_migrations(jobboard, small_cloud, db, driver, tmp_path):
    proc = start_conductor(conductor_config(jobboard, tmp_path / "mf.conf"), tmp_path / "c.log")
    try:
        inst = small_cloud["instance"]
        mig = api.MigrationAPI().live_migrate(inst["uuid"], "host-b", wait=True)
        assert mig["status"] == "completed", (tmp_path / "c.log").read_text()[-2000:]
        assert db.get_instance(inst["uuid"])["host"] == "host-b"
        wait_until(lambda: engine.get_board().job_count == 0, what="job consumed")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = (tmp_path / "c.log").read_text()
    assert "started" in log and "job consumed" in log and "stopped" in log


def test_sigterm_mid_copy_hands_the_migration_to_another_conductor(
        jobboard, small_cloud, db, driver, tmp_path):
    inst = small_cloud["instance"]
    config = conductor_config(jobboard, tmp_path / "mf.conf")
    # the copy makes no progress until the fault is cleared
    driver.inject_fault("get_migration_job", action="hang", instance=inst["uuid"], count=-1)
    first = start_conductor(config, tmp_path / "first.log")
    mig = api.MigrationAPI().live_migrate(inst["uuid"], "host-b", wait=False)
    wait_until(lambda: db.get_migration(mig["uuid"])["status"] == "running",
                what="the copy to start")
    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert time.monotonic() - started < 15, "a stalled copy held the shutdown"
    # not failed, not rolled back: the copy goes on, the job is free
    assert db.get_migration(mig["uuid"])["status"] == "running"
    assert [g["state"] for g in driver.guests("host-a")] == ["running"]
    jobs = list(engine.get_board().iterjobs(ensure_fresh=True))
    assert [j.uuid for j in jobs] == [db.get_migration(mig["uuid"])["job_uuid"]]
    assert engine.get_board().find_owner(jobs[0]) is None

    driver.clear_faults()
    second = start_conductor(config, tmp_path / "second.log")
    try:
        done = api.MigrationAPI().wait(mig["uuid"], timeout=60)
        assert done["status"] == "completed", done["error"]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    got = db.get_instance(inst["uuid"])
    assert (got["host"], got["task_state"]) == ("host-b", None)
    # the second conductor re-attached to the copy: it was started once
    effects = driver.side_effects(inst["uuid"])
    assert effects[("live_migration", "host-a")] == 1
    assert all(n == 1 for n in effects.values()), effects
    assert "detached for another conductor" in (tmp_path / "first.log").read_text()
    assert os.path.exists(tmp_path / "second.log")


def test_conductor_confirms_resizes_past_the_window(jobboard, small_cloud, db, driver,
                                                    tmp_path):
    """resize_confirm_window > 0: the conductor's periodic task confirms a
    finished resize once the window passed, through a confirm job it runs."""
    inst = small_cloud["instance"]
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    jobboard.set_override("enabled", False, group="jobboard")
    mig = api.MigrationAPI().resize(inst["uuid"], "m4", host="host-c")
    assert mig["status"] == "finished", mig["error"]
    jobboard.set_override("enabled", True, group="jobboard")
    config = conductor_config(jobboard, tmp_path / "mf.conf")
    with open(config, "a") as f:
        f.write("[DEFAULT]\nresize_confirm_window = 1\n")
    proc = start_conductor(config, tmp_path / "c.log")
    try:
        wait_until(lambda: db.get_migration(mig["uuid"])["status"] == "confirmed",
                   timeout=30, what="the auto-confirm")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert driver.guests("host-a") == []
    got = db.get_instance(inst["uuid"])
    assert (got["host"], got["vm_state"], got["flavor_name"]) == ("host-c", "active", "m4")
    assert "auto-confirm migration=" in (tmp_path / "c.log").read_text()
