"""Convergence escalation: the policy on its own (tasks/convergence.py), then
the real flow on SQLite and the fake hypervisors, whose pre-copy model
makes a guest dirtying memory faster than the link never converge.

vm-1 has 2 GiB and the fake's link moves 1 GiB/s: one pass of a guest
dirtying 4 GiB/s takes 2 simulated seconds and leaves all 2 GiB dirty.
"""
import pytest

from helpers import snapshot
from migrateflow import api
from migrateflow import exceptions as exc
from migrateflow.tasks import convergence, live_migrate

STUCK_RATE = 4096.0
#: 3 iterations of patience: the baseline pass, then 3 stuck passes (2
#: simulated seconds each) before the ladder is climbed
LADDER_OVERRIDES = {"live_migration_escalation": True,
                    "live_migration_escalation_iterations": 3}


# -- the policy on its own ----------------------------------------------------------

def job(iteration, remaining, dirty, processed=0.0, elapsed=0.0, throttle=0, bw=100.0,
        post_copy=False):
    return {"iteration": iteration, "memory_remaining_mb": remaining,
            "dirty_rate_mbps": dirty, "memory_processed_mb": processed,
            "time_elapsed": elapsed, "throttle_pct": throttle, "bandwidth_mbps": bw,
            "post_copy": post_copy}


def feed(ladder, looks):
    return [(s.rung, s.outcome) for j in looks for s in ladder.observe(j)]


def stuck_looks(n, first=1, throttles=None, remaining=40.0):
    """Passes leaving ``remaining`` MiB dirty (at 100 MiB/s: 400 ms, which the
    maximum downtime of 500 ms could hold)."""
    return [job(i, remaining, 150.0, elapsed=2.0 * i,
                throttle=(throttles or {}).get(i, 0)) for i in range(first, first + n)]


def test_a_converging_copy_is_not_escalated():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    looks = [job(i, 1000.0 / 2 ** i, 20.0) for i in range(1, 12)]
    assert feed(ladder, looks) == []
    assert not ladder.raised_downtime


def test_looks_at_a_job_being_set_up_do_not_count():
    ladder = convergence.Escalation(1, 500, 50, post_copy_permitted=True)
    # no figures yet (iteration 0), then the first pass: only a baseline
    looks = [job(0, 256.0, 0.0), job(0, 256.0, 0.0), job(1, 250.0, 0.0)]
    assert feed(ladder, looks) == []
    assert feed(ladder, [job(2, 40.0, 5.0)]) == []          # shrank, slow dirtying
    assert feed(ladder, [job(3, 40.0, 5.0)]) == [("max-downtime", "applied")]


def test_several_looks_in_one_iteration_count_once():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    looks = [job(i, 45.0 - k, 150.0) for i in (1, 2, 3) for k in range(5)]
    # iterations 2 and 3 are the two stuck ones: rung 1 on the first look at 3
    assert feed(ladder, looks) == [("max-downtime", "applied")]


def test_the_ladder_with_post_copy_permitted():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    assert feed(ladder, stuck_looks(3)) == [("max-downtime", "applied")]
    assert ladder.raised_downtime and ladder.downtime_ms == 500
    # auto-converge is not on (no throttle): skipped, post-copy at once
    assert feed(ladder, stuck_looks(2, first=4)) == [
        ("auto-converge", "skipped"), ("post-copy", "applied")]
    assert ladder.exhausted
    assert feed(ladder, stuck_looks(6, first=6)) == []


def test_a_downtime_that_cannot_hold_a_pass_is_not_waited_for():
    """200 MiB left at 100 MiB/s needs 2 s of downtime, more than the 500 ms
    allowed: the next rungs follow in the same look."""
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    assert feed(ladder, stuck_looks(3, remaining=200.0)) == [
        ("max-downtime", "applied"), ("auto-converge", "skipped"), ("post-copy", "applied")]


def test_the_ladder_without_post_copy_ends_with_nothing_applied():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=False)
    assert feed(ladder, stuck_looks(5)) == [
        ("max-downtime", "applied"), ("auto-converge", "skipped"), ("post-copy", "skipped")]
    assert ladder.exhausted


def test_dirtying_faster_than_the_link_is_not_converging_even_while_shrinking():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    looks = [job(i, 100.0 / 2 ** i, 120.0) for i in range(1, 4)]
    assert feed(ladder, looks) == [("max-downtime", "applied")]


def test_the_bandwidth_is_measured_when_the_driver_gives_none():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    # 100 MiB sent per second, the guest dirties 150 MiB/s
    looks = [job(i, 100.0 / 2 ** i, 150.0, processed=100.0 * i, elapsed=float(i), bw=None)
             for i in range(1, 4)]
    assert feed(ladder, looks) == [("max-downtime", "applied")]
    assert ladder.bandwidth(looks[-1]) == pytest.approx(100.0)


def test_a_downtime_already_at_its_maximum_is_skipped():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    ladder.ramp_step(500)
    assert feed(ladder, stuck_looks(3)) == [
        ("max-downtime", "skipped"), ("auto-converge", "skipped"), ("post-copy", "applied")]


def test_auto_converge_on_is_given_time_while_the_throttle_rises():
    ladder = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    throttles = {i: min(99, 20 + 10 * (i - 4)) for i in range(4, 30)}
    assert feed(ladder, stuck_looks(3, throttles=throttles)) == [("max-downtime", "applied")]
    # rising throttle: one "active" step, then waiting without steps
    assert feed(ladder, stuck_looks(2, first=4, throttles=throttles)) == [
        ("auto-converge", "active")]
    assert feed(ladder, stuck_looks(7, first=6, throttles=throttles)) == []
    # at 99 % and still stuck: post-copy
    assert feed(ladder, stuck_looks(4, first=13, throttles=throttles)) == [
        ("post-copy", "applied")]


def test_a_watch_resumed_from_the_note_does_not_climb_the_same_rungs():
    first = convergence.Escalation(2, 500, 50, post_copy_permitted=True)
    steps = [s for j in stuck_looks(3) for s in first.observe(j)]
    note = first.taken(steps[0])
    again = convergence.Escalation(2, 500, 50, post_copy_permitted=True, note=note)
    assert again.raised_downtime
    assert feed(again, stuck_looks(3, first=10)) == [
        ("auto-converge", "skipped"), ("post-copy", "applied")]
    assert again.history == [steps[0].describe()]


def test_no_escalation_in_post_copy():
    ladder = convergence.Escalation(1, 500, 50, post_copy_permitted=True)
    looks = [job(i, 200.0, 150.0, post_copy=True) for i in range(1, 8)]
    assert feed(ladder, looks) == []


# -- the flow with the fake hypervisors ----------------------------------------------

@pytest.fixture
def stuck(small_cloud, driver, conf):
    """vm-1 dirtying memory four times faster than the link copies it."""
    inst = small_cloud["instance"]
    driver.set_dirty_rate(inst["uuid"], STUCK_RATE)
    return inst


def _configure(conf, **values):
    for name, value in values.items():
        conf.set_override(name, value, group="migration")


def _note(mig):
    return mig["scheduler_notes"].get(convergence.NOTE_KEY, "")


def _rungs(mig):
    return [part.split(" ")[:2] for part in _note(mig).split(convergence.SEPARATOR) if part]


def _calls(driver, uuid, method):
    return driver.side_effects(uuid).get((method, "host-a"), 0)


def _runs_only_on(db, driver, uuid, host):
    inst = db.get_instance(uuid)
    assert (inst["host"], inst["task_state"], inst["power_state"]) == (host, None, "running")
    for name in ("host-a", "host-b", "host-c"):
        expected = [(uuid, "running", True)] if name == host else []
        assert [(g["uuid"], g["state"], g["persistent"])
                for g in driver.guests(name)] == expected


def test_escalation_ladder_ends_in_post_copy(stuck, db, driver, conf):
    _configure(conf, live_migration_permit_post_copy=True, **LADDER_OVERRIDES)
    uuid = stuck["uuid"]

    mig = api.MigrationAPI().live_migrate(uuid, "host-b")

    assert (mig["status"], mig["post_copy"]) == ("completed", True), mig["error"]
    assert _rungs(mig) == [["max-downtime", "applied"], ["auto-converge", "skipped"],
                           ["post-copy", "applied"]]
    # 2 GiB left at 1 GiB/s needs 2 s of downtime, more than the 500 ms
    # allowed: the whole ladder at the third stuck pass, long before the
    # completion timeout (800 s/GiB × 2 GiB)
    assert "post-copy applied at iteration 4 (8.0 s)" in _note(mig)
    assert mig["iteration"] <= 5
    _runs_only_on(db, driver, uuid, "host-b")
    assert _calls(driver, uuid, "live_migration_set_downtime") == 1
    assert _calls(driver, uuid, "live_migration_force_complete") == 1
    events = [e["event"] for e in driver.timeline(uuid)]
    assert events.index("migration.started") < events.index("migration.completed")


def test_reference_policy_waits_for_the_timeout_and_aborts(stuck, db, driver, conf):
    """Escalation off: the same guest is copied in circles until the
    completion timeout, then the copy is aborted."""
    _configure(conf, live_migration_permit_post_copy=True,
               live_migration_completion_timeout=20, live_migration_escalation=False)
    uuid = stuck["uuid"]
    before = snapshot(db, driver, uuid)

    mig = api.MigrationAPI().live_migrate(uuid, "host-b")

    assert mig["status"] == "failed" and "did not complete within 40 s" in mig["error"]
    assert mig["iteration"] > 20 and not mig["post_copy"]
    assert _note(mig) == ""
    assert snapshot(db, driver, uuid) == before
    assert _calls(driver, uuid, "live_migration_force_complete") == 0


def test_a_converging_migration_is_not_escalated(small_cloud, db, driver, conf):
    _configure(conf, live_migration_permit_post_copy=True, **LADDER_OVERRIDES)
    uuid = small_cloud["instance"]["uuid"]
    driver.set_dirty_rate(uuid, 300.0)   # well below the link: it converges

    mig = api.MigrationAPI().live_migrate(uuid, "host-b")

    assert (mig["status"], mig["post_copy"]) == ("completed", False), mig["error"]
    assert _note(mig) == ""
    assert mig["iteration"] >= 3         # it took several passes, none escalated
    _runs_only_on(db, driver, uuid, "host-b")
    assert _calls(driver, uuid, "live_migration_set_downtime") == 0
    assert _calls(driver, uuid, "live_migration_force_complete") == 0


def test_auto_converge_started_with_the_job_finishes_it(stuck, db, driver, conf):
    _configure(conf, live_migration_permit_auto_converge=True, **LADDER_OVERRIDES)
    uuid = stuck["uuid"]

    mig = api.MigrationAPI().live_migrate(uuid, "host-b")

    assert (mig["status"], mig["post_copy"]) == ("completed", False), mig["error"]
    assert _rungs(mig) == [["max-downtime", "applied"], ["auto-converge", "active"]]
    _runs_only_on(db, driver, uuid, "host-b")
    assert _calls(driver, uuid, "live_migration_force_complete") == 0


def test_without_post_copy_the_timeout_still_ends_a_hopeless_copy(stuck, db, driver, conf):
    _configure(conf, live_migration_completion_timeout=20, **LADDER_OVERRIDES)
    uuid = stuck["uuid"]
    before = snapshot(db, driver, uuid)

    mig = api.MigrationAPI().live_migrate(uuid, "host-b")

    assert mig["status"] == "failed" and "did not complete" in mig["error"]
    assert _rungs(mig) == [["max-downtime", "applied"], ["auto-converge", "skipped"],
                           ["post-copy", "skipped"]]
    assert snapshot(db, driver, uuid) == before


def test_a_reattached_watch_goes_on_from_the_recorded_rungs(stuck, db, driver, conf):
    """The switch to post-copy happens, then its reply is lost (the task
    fails); the re-run watches the post-copy to its end and records no
    rung twice."""
    from test_tasks import Migration

    _configure(conf, live_migration_permit_post_copy=True, **LADDER_OVERRIDES)
    uuid = stuck["uuid"]
    mig = Migration(db, driver, uuid, "host-b")
    mig.run_until("live-migration")
    driver.inject_fault("live_migration_force_complete", instance=uuid, when="after")
    task = live_migrate.LiveMigrate()
    with pytest.raises(exc.InjectedFault):
        mig.execute(task)
    driver.inject_fault("get_migration_job", action="hang", instance=uuid)

    summary = mig.execute(task)

    got = db.get_migration(mig.id)
    assert summary["post_copy"] is True
    assert _rungs(got) == [["max-downtime", "applied"], ["auto-converge", "skipped"],
                           ["post-copy", "applied"]]
    assert driver.guests("host-a") == []
    assert [(g["uuid"], g["state"]) for g in driver.guests("host-b")] == [(uuid, "running")]
    assert _calls(driver, uuid, "live_migration_force_complete") == 1
