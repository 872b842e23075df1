"""Evacuation off a dead host: every task on its own (execute, revert,
idempotency) and the flow end to end (shared and local storage, a failure
at every step, retry on the next candidate, fencing).  The dead host coming
back, refused requests and whole-host evacuation are in
tests/test_evacuation_host.py.  Real TaskFlow engines, SQLite state, fake
hypervisors; end states are checked in the database and the driver (the
world: tests/evacuation_world.py).
"""
import functools

import pytest
from taskflow.types.failure import Failure

import task_checks
from evacuation_world import (SOURCE, SHARED, LOCAL, DESTS, STEPS, TASK_CLASSES,
                             UNDOING_STEPS, _api, crash, ports_of, guests,
                             assert_evacuated, has_disk, spy)
from helpers import CaptureFactory, fail_after_execute, snapshot
from migrateflow import graph
from migrateflow import exceptions as exc
from migrateflow.db import api as db_api
from migrateflow.flows import evacuation
from migrateflow.tasks import evacuate


# == the flow's contract =====================================================

def test_flow_declares_exact_requirements():
    flow = evacuation.build()
    assert set(flow.requires) == set(evacuation.REQUIRES)
    assert len(STEPS) == len(set(STEPS))
    assert STEPS == [
        "start-evacuation", "check-source-down", "fence-source", "check-candidate-host",
        "claim-destination-resources", "check-disk-on-destination",
        "bind-ports-on-destination", "connect-volumes-on-destination",
        "rebuild-on-destination", "record-instance-evacuated"]


def test_flow_is_registered_and_every_step_documents_its_revert():
    assert graph.OPERATIONS[evacuation.NAME].factory is evacuation.build
    tree = graph.describe(evacuation.build())
    assert all(step.reverts_by for step in graph.steps(tree) if not step.is_retry)
    assert graph.render(evacuation.NAME, "sequence").startswith("@startuml")


# == every task on its own ==================================================

def fresh(step):
    return TASK_CLASSES[step]()


@DESTS
@pytest.mark.parametrize("step", STEPS)
def test_execute_twice_leaves_the_state_of_once(step, dest, evac):
    task_checks.execute_twice_is_once(evac(dest, upto=step), fresh(step))


@DESTS
@pytest.mark.parametrize("step", STEPS)
def test_revert_twice_leaves_the_state_of_once(step, dest, evac):
    task_checks.revert_twice_is_once(evac(dest, upto=step), fresh(step))


@DESTS
@pytest.mark.parametrize("step", UNDOING_STEPS)
def test_revert_restores_the_state_before_execute(step, dest, evac):
    task_checks.revert_undoes_execute(evac(dest, upto=step), fresh(step))


@DESTS
@pytest.mark.parametrize("step", UNDOING_STEPS)
def test_revert_after_a_late_failure_undoes_the_work(step, dest, evac):
    """The step died after doing its work: the revert (result a Failure)
    still undoes it."""
    mig = evac(dest, upto=step)
    task = fresh(step)
    before = mig.state(side_effects=False)
    mig.execute(task)
    mig.revert(task, Failure.from_exception(exc.DriverError("reply lost")))
    assert mig.state(side_effects=False) == before


def test_start_moves_accepted_to_pre_migrating(evac):
    mig = evac(upto="start-evacuation")
    assert mig.migration()["status"] == "accepted"
    assert mig.instance()["task_state"] == "rebuilding"
    mig.execute(evacuate.StartEvacuation())
    assert mig.migration()["status"] == "pre-migrating"


def test_start_revert_fails_the_evacuation_and_leaves_the_instance_in_error(evac):
    mig = evac(upto="rebuild-on-destination")
    fails = {"rebuild-on-destination": Failure.from_exception(exc.DriverError("no image"))}
    mig.revert(evacuate.StartEvacuation(), flow_failures=fails)
    got = mig.migration()
    assert (got["status"], got["error"], got["current_step"]) == (
        "failed", "rebuild-on-destination: no image", None)
    inst = mig.instance()
    assert (inst["host"], inst["task_state"], inst["vm_state"]) == (SOURCE, None, "error")


@pytest.mark.parametrize("breakage, words", [
    (lambda db, mig: db.update_host(SOURCE, up=True), "source host host-a is up"),
    (lambda db, mig: db.update_instance(mig.instance_id, host=LOCAL), "not being evacuated"),
], ids=["source-up", "instance-elsewhere"])
def test_check_source_down_refuses(breakage, words, evac, db):
    mig = evac(upto="check-source-down")
    breakage(db, mig)
    before = mig.state()
    with pytest.raises(exc.InvalidRequest, match=words):
        mig.execute(evacuate.CheckSourceDown())
    assert mig.state() == before


def test_check_source_down_passes_when_the_source_came_back_and_cleaned_up(evac, db):
    mig = evac(upto="check-source-down")
    db.update_host(SOURCE, up=True)
    db.mark_source_cleaned(mig.id)
    assert mig.execute(evacuate.CheckSourceDown()) is None


def test_fence_an_unreachable_source_is_expected(evac, driver):
    mig = evac(upto="fence-source")
    before = mig.state()
    assert mig.execute(evacuate.FenceSource()) is None
    assert mig.state() == before


def test_fence_powers_off_a_source_that_still_answers(evac, driver):
    mig = evac(upto="fence-source", crashed=False)
    assert guests(driver, SOURCE) == [(mig.instance_id, "running")]
    mig.execute(evacuate.FenceSource())
    assert guests(driver, SOURCE) == [(mig.instance_id, "shutdown")]
    assert driver.side_effects(mig.instance_id)[("power_off", SOURCE)] == 1


def test_fence_fails_when_the_source_guest_keeps_running(evac, driver):
    mig = evac(upto="fence-source", crashed=False)
    driver.inject_fault("power_off", host=SOURCE, message="qemu hung")
    with pytest.raises(exc.DriverError, match="cannot fence .* still running on host-a"):
        mig.execute(evacuate.FenceSource())


def test_fence_accepts_a_source_without_the_guest(evac, driver, db):
    mig = evac(upto="fence-source", crashed=False)
    driver.destroy(SOURCE, db_api.instance_to_driver(mig.instance()), destroy_disks=False)
    mig.execute(evacuate.FenceSource())  # power_off says "no guest": fenced


@pytest.mark.parametrize("dest, shared", [(SHARED, True), (LOCAL, False)])
def test_check_disk_tells_whether_the_disk_is_on_the_destination(dest, shared, evac):
    mig = evac(dest, upto="check-disk-on-destination")
    assert mig.execute(evacuate.CheckDiskOnDestination()) is shared
    assert mig.store["on_shared_storage"] is shared


def test_bind_ports_moves_every_binding_to_the_destination(evac, db):
    mig = evac(upto="bind-ports-on-destination")
    info = mig.execute(evacuate.BindPortsOnDestination())
    ports = ports_of(db, mig.instance_id)
    assert {i["port_id"] for i in info} == ports
    assert mig.state()["snapshot"]["bindings"] == sorted((p, SHARED, "ACTIVE") for p in ports)


def test_connect_volumes_moves_every_connection_to_the_destination(evac, db):
    mig = evac(LOCAL, upto="connect-volumes-on-destination")
    (bdm,) = db.list_block_devices(mig.instance_id)
    info = mig.execute(evacuate.ConnectVolumesOnDestination())
    assert info == [{"volume_id": bdm["volume_id"], "device": "/dev/vda"}]
    assert mig.state()["snapshot"]["volume_connections"] == [(bdm["volume_id"], LOCAL)]


@pytest.mark.parametrize("dest, power_on", [(SHARED, True), (LOCAL, True), (LOCAL, False)])
def test_rebuild_reuses_the_shared_disk_or_makes_one_from_the_image(
        dest, power_on, evac, db, driver, monkeypatch):
    mig = evac(dest, upto="rebuild-on-destination")
    db.update_instance(mig.instance_id, image_ref="cirros-0.6")
    mig.store["power_on"] = power_on
    calls = spy(monkeypatch, driver, "rebuild")
    state = "running" if power_on else "shutdown"
    assert mig.execute(evacuate.RebuildOnDestination()) == state
    assert [(c["host"], c["image_ref"], c["on_shared_storage"], c["power_on"])
            for c in calls] == [(dest, "cirros-0.6", dest == SHARED, power_on)]
    assert guests(driver, dest) == [(mig.instance_id, state)]
    assert has_disk(driver, dest, mig.instance_id)
    assert {v["port_id"] for v in driver.vifs(dest)} == ports_of(db, mig.instance_id)


def test_rebuild_revert_keeps_the_shared_disk(evac, driver):
    mig = evac(SHARED, upto="rebuild-on-destination")
    task = evacuate.RebuildOnDestination()
    mig.revert(task, mig.execute(task))
    assert guests(driver, SHARED) == [] and has_disk(driver, SHARED, mig.instance_id)


def test_rebuild_revert_survives_an_unreachable_destination(evac, driver):
    mig = evac(LOCAL, upto="rebuild-on-destination")
    task = evacuate.RebuildOnDestination()
    result = mig.execute(task)
    driver.inject_fault("destroy", host=LOCAL, message="host-c unreachable")
    mig.revert(task, result)  # logged, not raised
    assert guests(driver, LOCAL) == [(mig.instance_id, "running")]


@pytest.mark.parametrize("cleaned_first, status", [(False, "done"), (True, "completed")])
def test_record_moves_the_instance_to_the_destination(cleaned_first, status, evac, db,
                                                      driver):
    mig = evac(LOCAL, upto="record-instance-evacuated")
    if cleaned_first:
        db.mark_source_cleaned(mig.id)
    mig.execute(evacuate.RecordInstanceEvacuated())
    assert mig.migration()["status"] == status
    assert_evacuated(db, driver, mig.instance_id, LOCAL)


def test_record_completes_when_the_source_cleaned_up_meanwhile(evac, db, monkeypatch):
    """The source marks the record cleaned between finish_evacuation's read
    and its write: the step sees it and completes the record."""
    mig = evac(upto="record-instance-evacuated")
    real = type(db).finish_evacuation

    def racing(self, migration_uuid, *args):
        done = real(self, migration_uuid, *args)
        self.update_migration(migration_uuid, source_cleaned=True)
        return done

    monkeypatch.setattr(type(db), "finish_evacuation", racing)
    mig.execute(evacuate.RecordInstanceEvacuated())
    assert mig.migration()["status"] == "completed"


# == the flow end to end =====================================================

def test_evacuation_on_shared_storage_reuses_the_disk(dead_cloud, db, driver, monkeypatch):
    uuid = dead_cloud["uuid"]
    calls = spy(monkeypatch, driver, "rebuild")
    mig = _api().evacuate(uuid, SHARED)
    assert (mig["status"], mig["dest_host"], mig["error"], mig["migration_type"]) == (
        "done", SHARED, None, "evacuation")
    assert [c["on_shared_storage"] for c in calls] == [True]
    assert_evacuated(db, driver, uuid, SHARED)
    assert has_disk(driver, SHARED, uuid)
    # the dead source still holds its stale, stopped copy until it comes back
    assert guests(driver, SOURCE) == [(uuid, "shutdown")]


def test_evacuation_to_local_storage_rebuilds_from_the_image(dead_cloud, db, driver,
                                                             monkeypatch):
    uuid = dead_cloud["uuid"]
    calls = spy(monkeypatch, driver, "rebuild")
    mig = _api().evacuate(uuid, LOCAL)
    assert (mig["status"], mig["dest_host"]) == ("done", LOCAL)
    assert [c["on_shared_storage"] for c in calls] == [False]
    assert_evacuated(db, driver, uuid, LOCAL)
    assert has_disk(driver, LOCAL, uuid)


def test_stopped_instance_stays_stopped(small_cloud, db, driver):
    uuid = small_cloud["instance"]["uuid"]
    driver.power_off(SOURCE, db_api.instance_to_driver(small_cloud["instance"]))
    db.update_instance(uuid, vm_state="stopped", power_state="shutdown")
    crash(db, driver)
    assert _api().evacuate(uuid, LOCAL)["status"] == "done"
    assert_evacuated(db, driver, uuid, LOCAL, power="shutdown")


def test_scheduler_chooses_and_retries_on_the_next_candidate(dead_cloud, db, driver):
    uuid = dead_cloud["uuid"]
    driver.inject_fault("instance_on_disk", host=SHARED, message="storage offline")
    mig = _api().evacuate(uuid)
    assert (mig["status"], mig["dest_host"]) == ("done", LOCAL)
    assert "storage offline" in mig["scheduler_notes"][SHARED]
    assert_evacuated(db, driver, uuid, LOCAL)


def test_no_candidate_left_rolls_back(dead_cloud, db, driver):
    uuid = dead_cloud["uuid"]
    before = snapshot(db, driver, uuid)
    driver.inject_fault("instance_on_disk", count=-1, message="storage offline")
    mig = _api().evacuate(uuid)
    assert mig["status"] == "failed" and "no valid host" in mig["error"]
    assert SHARED in mig["error"] and LOCAL in mig["error"]
    before["instance"]["vm_state"] = "error"
    assert snapshot(db, driver, uuid) == before


def fail_before_execute(monkeypatch, task_cls):
    """The step fails before changing anything (its database write failed)."""
    real = task_cls.execute

    @functools.wraps(real)
    def execute(self, *args, **kwargs):
        raise exc.InjectedFault(f"injected failure in {self.NAME}")

    monkeypatch.setattr(task_cls, "execute", execute)


def _inject(step, monkeypatch, driver, uuid):
    """Fail ``step``: through the fake driver where the step's work is a
    hypervisor call, else after the step's own database work."""
    driver_faults = {"check-disk-on-destination": "instance_on_disk",
                     "rebuild-on-destination": "rebuild"}
    if step in driver_faults:
        driver.inject_fault(driver_faults[step], instance=uuid, when="after",
                            message=f"injected fault in {step}")
    elif step == "record-instance-evacuated":
        fail_before_execute(monkeypatch, TASK_CLASSES[step])
    else:
        fail_after_execute(monkeypatch, TASK_CLASSES[step])


@pytest.mark.parametrize("step", STEPS)
@DESTS
def test_failure_at_each_step_rolls_back(step, dest, dead_cloud, db, driver, monkeypatch):
    uuid = dead_cloud["uuid"]
    before = snapshot(db, driver, uuid)
    _inject(step, monkeypatch, driver, uuid)
    capture = CaptureFactory()
    mig = _api(capture).evacuate(uuid, dest)

    assert mig["status"] == "failed"
    assert step in mig["error"] and "injected" in mig["error"]
    cap = capture.last
    assert cap.failed() == [step]
    assert cap.reverted() == STEPS[:STEPS.index(step) + 1][::-1]
    # the instance is released on its source in error; nothing else changed
    before["instance"]["vm_state"] = "error"
    assert snapshot(db, driver, uuid) == before
    assert db.list_claims() == [] and guests(driver, dest) == []


def test_a_failure_after_the_instance_was_recorded_keeps_the_evacuation(
        dead_cloud, db, driver, monkeypatch):
    """The last step committed, then failed: nothing is undone (every
    revert sees the instance on the destination)."""
    uuid = dead_cloud["uuid"]
    fail_after_execute(monkeypatch, evacuate.RecordInstanceEvacuated)
    mig = _api().evacuate(uuid, LOCAL)
    assert mig["status"] == "done"
    assert_evacuated(db, driver, uuid, LOCAL)


def test_instance_in_error_can_be_evacuated_again(dead_cloud, db, driver):
    uuid = dead_cloud["uuid"]
    driver.inject_fault("rebuild", instance=uuid, message="no space left")
    assert _api().evacuate(uuid, LOCAL)["status"] == "failed"
    assert db.get_instance(uuid)["vm_state"] == "error"
    mig = _api().evacuate(uuid, LOCAL)
    assert mig["status"] == "done"
    assert_evacuated(db, driver, uuid, LOCAL)  # error → active and running


def test_a_forced_down_source_that_still_answers_is_fenced(small_cloud, db, driver):
    uuid = small_cloud["instance"]["uuid"]
    db.update_host(SOURCE, forced_down=True)
    mig = _api().evacuate(uuid, SHARED)
    assert mig["status"] == "done"
    assert guests(driver, SOURCE) == [(uuid, "shutdown")]
    assert guests(driver, SHARED) == [(uuid, "running")]


def test_evacuation_stops_when_fencing_fails(small_cloud, db, driver):
    uuid = small_cloud["instance"]["uuid"]
    db.update_host(SOURCE, forced_down=True)
    before = snapshot(db, driver, uuid)
    driver.inject_fault("power_off", host=SOURCE, message="qemu hung")
    mig = _api().evacuate(uuid, SHARED)
    assert mig["status"] == "failed" and "cannot fence" in mig["error"]
    before["instance"]["vm_state"] = "error"
    assert snapshot(db, driver, uuid) == before


def test_background_evacuation_and_its_steps(dead_cloud, db):
    client = _api()
    mig = client.evacuate(dead_cloud["uuid"], SHARED, wait=False)
    assert mig["status"] in ("accepted", "pre-migrating", "done")
    mig = client.wait(mig["uuid"], timeout=60)
    assert mig["status"] == "done"
    steps = client.flow_steps(mig["uuid"])
    assert [s["name"] for s in steps if s["kind"] == "task"] == STEPS
