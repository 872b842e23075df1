"""Evacuation off a dead host: every task on its own (execute, revert,
idempotency), the flow end to end (shared and local storage, a failure at
every step, retry on the next candidate, fencing), the dead host coming
back during and after an evacuation, refused requests, and a whole host's
evacuation with each recovery method.  Real TaskFlow engines, SQLite state,
fake hypervisors; end states are checked in the database and the driver.

small_cloud: host-a and host-b share storage (nfs-1), host-c is local;
vm-1 (2 ports, 1 volume) runs on host-a, which the tests crash.
"""
import functools
import inspect
import threading

import pytest
from taskflow import states as tf_states
from taskflow.listeners import base as listener_base
from taskflow.types.failure import Failure

import task_checks
from helpers import CaptureFactory, fail_after_execute, snapshot, wait_until
from migrateflow import api, cloud, graph
from migrateflow import exceptions as exc
from migrateflow.db import api as db_api
from migrateflow.flows import evacuation
from migrateflow.tasks import evacuate

SOURCE, SHARED, LOCAL = "host-a", "host-b", "host-c"
DESTS = pytest.mark.parametrize("dest", [SHARED, LOCAL])


def flow_tasks():
    return list(task_checks.tasks_of(evacuation.build()))


STEPS = [task.name for task in flow_tasks()]
PROVIDES = {task.name: [str(key) for key in task.provides] for task in flow_tasks()}
TASK_CLASSES = {task.name: type(task) for task in flow_tasks()}
UNDOING_STEPS = ["claim-destination-resources", "bind-ports-on-destination",
                 "connect-volumes-on-destination", "rebuild-on-destination"]


def _api(*listeners):
    return api.MigrationAPI(listeners=listeners)


def crash(db, driver, host=SOURCE):
    """The host dies: unreachable hypervisor, guests off, DB row down."""
    driver.crash_host(host)
    db.update_host(host, up=False)


def come_back(db, driver, host=SOURCE):
    driver.set_host_up(host, True)
    return _api().host_started(host)


@pytest.fixture
def dead_cloud(small_cloud, db, driver):
    crash(db, driver)
    return small_cloud["instance"]


def ports_of(db, uuid):
    return {p["id"] for p in db.list_ports(uuid)}


def volumes_of(db, uuid):
    return {b["volume_id"] for b in db.list_block_devices(uuid)}


def guests(driver, host):
    return [(g["uuid"], g["state"]) for g in driver.guests(host)]


def assert_evacuated(db, driver, uuid, dest, power="running",
                     source_usage=(0, 0, 0)):
    """The instance lives on ``dest``: DB records and the hypervisor agree;
    no other live host has anything of it; no claim is left."""
    inst = db.get_instance(uuid)
    vm_state = "active" if power == "running" else "stopped"
    assert (inst["host"], inst["vm_state"], inst["task_state"], inst["power_state"]) == (
        dest, vm_state, None, power)
    assert guests(driver, dest) == [(uuid, power)]
    ports, volumes = ports_of(db, uuid), volumes_of(db, uuid)
    assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(uuid)} \
        == {(p, dest, "ACTIVE") for p in ports}
    assert {v["port_id"] for v in driver.vifs(dest)} == ports
    assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(uuid)} \
        == {(v, dest) for v in volumes}
    assert {v["volume_id"] for v in driver.volume_connections(dest)} == volumes
    for other in {SHARED, LOCAL} - {dest}:
        assert (driver.guests(other), driver.vifs(other),
                driver.volume_connections(other)) == ([], [], [])
    assert db.list_claims() == []
    usage = {h["name"]: (h["memory_used_mb"], h["vcpus_used"], h["disk_used_gb"])
             for h in db.list_hosts() if h["name"] in (SOURCE, SHARED, LOCAL)}
    assert usage == {SOURCE: source_usage, SHARED: (0, 0, 0), LOCAL: (0, 0, 0),
                     dest: (2048, 2, 20)}


def instance_dir(uuid):
    return f"/var/lib/migrateflow/instances/{uuid}"


def has_disk(driver, host, uuid):
    return instance_dir(uuid) in [f["path"] for f in driver.files(host)]


def spy(monkeypatch, driver, method):
    """Record the keyword arguments of every call of a driver method."""
    calls = []
    real = getattr(driver, method)
    signature = inspect.signature(real)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, method, wrapper)
    return calls


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

class Evacuation:
    """An evacuation of vm-1 accepted through the API and the flow store as
    the real steps run so far filled it."""

    def __init__(self, db, driver, instance_id, dest):
        self.db, self.driver, self.instance_id = db, driver, instance_id
        mig, store = api.MigrationAPI()._accept_evacuation(instance_id, dest)
        self.id = mig["uuid"]
        self.store = {str(key): value for key, value in store.items()}
        self.store["candidate"] = self.store["candidates"][0]
        self.done = 0

    def execute(self, task):
        result = task.execute(**{a: self.store[k] for a, k in task.rebind.items()})
        if self.done < len(STEPS) and task.name == STEPS[self.done]:
            self.done += 1
        for key in PROVIDES[task.name]:
            self.store[key] = result
        return result

    def revert(self, task, result=None, flow_failures=None):
        args = {a: self.store[k] for a, k in task.revert_rebind.items()}
        return task.revert(result=result, flow_failures=flow_failures or {}, **args)

    def run_until(self, step):
        for task in flow_tasks()[self.done:STEPS.index(step)]:
            self.execute(task)
        return self

    def migration(self):
        mig = self.db.get_migration(self.id)
        mig.pop("updated_at")
        return mig

    def instance(self):
        return self.db.get_instance(self.instance_id)

    def state(self, side_effects=True):
        state = {"snapshot": snapshot(self.db, self.driver, self.instance_id),
                 "migration": self.migration()}
        if side_effects:
            state["side_effects"] = self.driver.counters()
            state["timeline"] = [(e["event"], e["host"]) for e in self.driver.timeline()]
        return state


@pytest.fixture
def evac(small_cloud, db, driver):
    """Factory: crash host-a (unless ``crashed`` is False: then it is only
    forced down, its hypervisor still answering), accept an evacuation of
    vm-1 to ``dest`` and run the flow's steps before ``upto``."""
    def make(dest=SHARED, upto=None, crashed=True):
        if crashed:
            crash(db, driver)
        else:
            db.update_host(SOURCE, forced_down=True)
        mig = Evacuation(db, driver, small_cloud["instance"]["uuid"], dest)
        return mig.run_until(upto) if upto else mig
    return make


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


# == the dead host comes back ==================================================

class OnStep(listener_base.Listener):
    """Calls ``action`` when the flow starts running the step ``step``."""

    def __init__(self, engine, step, action):
        super().__init__(engine, task_listen_for=(tf_states.RUNNING,),
                         flow_listen_for=(), retry_listen_for=())
        self._step, self._action = step, action

    def _task_receiver(self, state, details):
        if details["task_name"] == self._step:
            self._action()


def by_name(report):
    return {entry["name"]: entry for entry in report}


@pytest.fixture
def busy_host(small_cloud, db, driver):
    """host-a with vm-1 (to evacuate), vm-2 (active, running), vm-3
    (stopped) and vm-4 (error); then host-a dies."""
    others = {}
    others["vm-2"] = cloud.add_instance(db, driver, "vm-2", SOURCE)
    others["vm-3"] = cloud.add_instance(db, driver, "vm-3", SOURCE)
    driver.power_off(SOURCE, db_api.instance_to_driver(others["vm-3"]))
    db.update_instance(others["vm-3"]["uuid"], vm_state="stopped", power_state="shutdown")
    others["vm-4"] = cloud.add_instance(db, driver, "vm-4", SOURCE)
    db.update_instance(others["vm-4"]["uuid"], vm_state="error")
    crash(db, driver)
    return dict(others, **{"vm-1": small_cloud["instance"]})


@DESTS
def test_source_back_after_evacuation_destroys_only_the_evacuated_copy(
        dest, busy_host, db, driver):
    uuid = busy_host["vm-1"]["uuid"]
    mig = _api().evacuate(uuid, dest)
    assert mig["status"] == "done"
    report = by_name(come_back(db, driver))

    assert report["vm-1"]["action"] == "destroyed"
    assert (report["vm-1"]["migration"], report["vm-1"]["status"]) == (mig["uuid"],
                                                                      "completed")
    assert db.get_migration(mig["uuid"])["status"] == "completed"
    assert [report[n]["action"] for n in ("vm-2", "vm-3", "vm-4")] == [
        "started", "left", "left"]
    # the evacuated copy is gone from host-a and never started there
    assert uuid not in [g["uuid"] for g in driver.guests(SOURCE)]
    assert not [v for v in driver.vifs(SOURCE) if v["instance"] == uuid]
    assert not [v for v in driver.volume_connections(SOURCE) if v["instance"] == uuid]
    assert ("power_on", SOURCE) not in driver.side_effects(uuid)
    # its disk stays where the destination uses it, else it is removed
    assert has_disk(driver, SOURCE, uuid) is (dest == SHARED)
    assert_evacuated(db, driver, uuid, dest, source_usage=(6144, 6, 60))
    states = dict(guests(driver, SOURCE))
    assert [states[busy_host[n]["uuid"]] for n in ("vm-2", "vm-3", "vm-4")] == [
        "running", "shutdown", "shutdown"]
    host = db.get_host(SOURCE)
    assert (host["up"], host["forced_down"]) == (True, False)


def test_source_back_keeps_forced_down_and_is_idempotent(busy_host, db, driver):
    uuid = busy_host["vm-1"]["uuid"]
    db.update_host(SOURCE, forced_down=True)
    _api().evacuate(uuid, LOCAL)
    come_back(db, driver)
    once = snapshot(db, driver, uuid)
    report = by_name(_api().host_started(SOURCE))
    assert "vm-1" not in report  # the record is completed: nothing left to do
    assert report["vm-2"]["action"] == "running"
    assert snapshot(db, driver, uuid) == once
    assert db.get_host(SOURCE)["forced_down"] is True


def test_source_back_during_the_evacuation(dead_cloud, db, driver):
    """host-a comes back while the guest is being rebuilt on host-b: its
    copy is destroyed at once (the disk kept: host-b shares it), the
    evacuation goes on and completes."""
    uuid = dead_cloud["uuid"]
    reports = []
    listener = functools.partial(OnStep, step="rebuild-on-destination",
                                 action=lambda: reports.append(come_back(db, driver)))
    mig = _api(listener).evacuate(uuid, SHARED)
    ((entry,),) = reports
    assert (entry["action"], entry["status"]) == ("destroyed", "pre-migrating")
    assert mig["status"] == "completed"
    assert_evacuated(db, driver, uuid, SHARED)
    assert guests(driver, SOURCE) == []
    assert ("power_on", SOURCE) not in driver.side_effects(uuid)


def test_source_back_during_an_evacuation_that_then_fails(dead_cloud, db, driver):
    """The rebuild hangs, host-a comes back and destroys its copy, the
    rebuild fails: the evacuation is failed, the instance in error on host-a
    and nothing runs anywhere (host-a never restarts it)."""
    uuid = dead_cloud["uuid"]
    driver.inject_fault("rebuild", action="hang", instance=uuid)
    client = _api()
    mig = client.evacuate(uuid, SHARED, wait=False)
    wait_until(lambda: db.get_migration(mig["uuid"])["current_step"]
               == "rebuild-on-destination", what="the rebuild to start")
    report = by_name(come_back(db, driver))
    assert report["vm-1"]["action"] == "destroyed"

    def released():
        driver.release_hangs()
        return db.get_migration(mig["uuid"])["status"] == "failed"
    wait_until(released, what="the evacuation to fail")
    client.wait(mig["uuid"], timeout=60)
    inst = db.get_instance(uuid)
    assert (inst["host"], inst["task_state"], inst["vm_state"]) == (SOURCE, None, "error")
    for host in (SOURCE, SHARED, LOCAL):
        assert driver.guests(host) == []
    assert has_disk(driver, SOURCE, uuid)  # kept: host-b shares host-a's storage
    assert db.list_claims() == []


def test_source_back_after_a_failed_evacuation_destroys_nothing(busy_host, db, driver):
    uuid = busy_host["vm-1"]["uuid"]
    driver.inject_fault("rebuild", instance=uuid, message="no space left")
    mig = _api().evacuate(uuid, LOCAL)
    assert mig["status"] == "failed"
    report = by_name(come_back(db, driver))
    assert report["vm-1"]["action"] == "left"  # vm_state error: not started
    assert (uuid, "shutdown") in guests(driver, SOURCE)
    assert has_disk(driver, SOURCE, uuid)
    assert ("destroy", SOURCE) not in driver.side_effects(uuid)
    assert db.get_migration(mig["uuid"])["status"] == "failed"


def test_source_back_before_the_destination_is_chosen_keeps_the_disk(evac, db, driver):
    mig = evac(LOCAL, upto="check-candidate-host")
    assert mig.migration()["dest_host"] is None
    report = by_name(come_back(db, driver))
    assert (report["vm-1"]["action"], report["vm-1"]["status"]) == ("destroyed",
                                                                    "pre-migrating")
    assert guests(driver, SOURCE) == [] and has_disk(driver, SOURCE, mig.instance_id)
    assert mig.migration()["source_cleaned"] is True


def test_source_back_with_a_failing_destroy_leaves_the_record_done(busy_host, db, driver):
    uuid = busy_host["vm-1"]["uuid"]
    mig = _api().evacuate(uuid, LOCAL)
    driver.inject_fault("destroy", host=SOURCE, instance=uuid, message="libvirt busy")
    report = by_name(come_back(db, driver))
    assert report["vm-1"]["action"] == "failed" and "libvirt busy" in report["vm-1"]["error"]
    assert db.get_migration(mig["uuid"])["status"] == "done"
    assert (uuid, "shutdown") in guests(driver, SOURCE)  # still off, never started
    # the next start of the host finishes the cleanup
    assert by_name(_api().host_started(SOURCE))["vm-1"]["status"] == "completed"
    assert uuid not in [g["uuid"] for g in driver.guests(SOURCE)]


def test_source_back_needs_its_hypervisor(busy_host, db, driver):
    uuid = busy_host["vm-1"]["uuid"]
    _api().evacuate(uuid, LOCAL)
    before = snapshot(db, driver, uuid)
    with pytest.raises(exc.HostUnavailable, match="host-a cannot start"):
        _api().host_started(SOURCE)  # still crashed
    assert snapshot(db, driver, uuid) == before
    assert db.get_host(SOURCE)["up"] is False


@pytest.mark.parametrize("host, error", [
    ("host-z", exc.HostNotFound), ("bad_host!", exc.InvalidHostName)])
def test_host_started_refuses_bad_hosts(host, error, dead_cloud):
    with pytest.raises(error):
        _api().host_started(host)


# == refused requests change nothing ==========================================

def _take_others_down(db, driver):
    for host in (SHARED, LOCAL):
        db.update_host(host, up=False)


@pytest.mark.parametrize("setup, instance, host, error, words", [
    (lambda db, driver: None, None, "host-z", exc.HostNotFound, "host-z"),
    (lambda db, driver: None, None, "bad_host!", exc.InvalidHostName, "malformed"),
    (lambda db, driver: None, None, "../../etc", exc.InvalidHostName, "malformed"),
    (lambda db, driver: None, None, SOURCE, exc.InvalidRequest, "current host"),
    (lambda db, driver: db.update_host(LOCAL, up=False), None, LOCAL, exc.HostUnavailable,
     "destination host host-c is down"),
    (lambda db, driver: db.update_host(LOCAL, disabled=True, disabled_reason="repair"),
     None, LOCAL, exc.HostUnavailable, "disabled: repair"),
    (lambda db, driver: db.update_host(LOCAL, memory_used_mb=64000), None, LOCAL,
     exc.InsufficientResources, "not enough memory"),
    (_take_others_down, None, None, exc.NoValidHost, "no valid host"),
    (lambda db, driver: None, "no-such-vm", SHARED, exc.InstanceNotFound, "no-such-vm"),
], ids=["unknown-dest", "malformed", "path", "dest-is-source", "dest-down",
        "dest-disabled", "dest-full", "no-valid-host", "unknown-instance"])
def test_refused_evacuation_changes_nothing(setup, instance, host, error, words,
                                            dead_cloud, db, driver):
    setup(db, driver)
    uuid = dead_cloud["uuid"]
    before = snapshot(db, driver, uuid)
    with pytest.raises(error, match=words):
        _api().evacuate(instance or uuid, host)
    assert snapshot(db, driver, uuid) == before
    assert db.list_migrations() == []


@pytest.mark.parametrize("values, error, words", [
    ({"task_state": "migrating"}, exc.InstanceBusy, "busy"),
    ({"vm_state": "resized"}, exc.InstanceInvalidState, "active, stopped or error"),
])
def test_instance_in_wrong_state_is_refused(values, error, words, dead_cloud, db, driver):
    uuid = dead_cloud["uuid"]
    db.update_instance(uuid, **values)
    before = snapshot(db, driver, uuid)
    with pytest.raises(error, match=words):
        _api().evacuate(uuid, SHARED)
    assert snapshot(db, driver, uuid) == before
    assert db.list_migrations() == []


def test_evacuation_from_a_host_that_is_up_is_refused(small_cloud, db, driver):
    uuid = small_cloud["instance"]["uuid"]
    before = snapshot(db, driver, uuid)
    with pytest.raises(exc.InvalidRequest) as raised:
        _api().evacuate(uuid, SHARED)
    assert str(raised.value) == ("source host host-a is up: evacuation needs it down "
                                 "(forced down or fenced)")
    assert snapshot(db, driver, uuid) == before
    assert db.list_migrations() == []


def test_concurrent_evacuations_have_one_winner(dead_cloud, db, driver):
    uuid = dead_cloud["uuid"]
    # the winner's flow waits in the rebuild until every request was answered
    driver.inject_fault("rebuild", action="hang", instance=uuid)
    client, results = _api(), []
    barrier = threading.Barrier(4)

    def request():
        barrier.wait()
        try:
            results.append(client.evacuate(uuid, SHARED, wait=False)["uuid"])
        except exc.InstanceBusy:
            results.append("busy")

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if r != "busy"]
    assert len(winners) == 1 and results.count("busy") == 3
    assert len(db.list_migrations()) == 1

    def ended():
        driver.release_hangs()
        return db.get_migration(winners[0])["status"] == "failed"
    wait_until(ended, what="the winner to end")
    assert client.wait(winners[0], timeout=60)["status"] == "failed"


# == a whole host ==============================================================

RESERVED = "host-r"
ALL = (SOURCE, SHARED, LOCAL, RESERVED)


@pytest.fixture
def failed_host(db, driver):
    """host-a (dead) with vm-1..vm-3; host-b, host-c; host-r reserved
    (disabled, room for two instances)."""
    cloud.add_host(db, driver, SOURCE, shared_storage="nfs-1")
    cloud.add_host(db, driver, SHARED, shared_storage="nfs-1")
    cloud.add_host(db, driver, LOCAL)
    cloud.add_host(db, driver, RESERVED, memory_mb=4096, disabled=True)
    db.update_host(RESERVED, disabled_reason="reserved for failures")
    insts = [cloud.add_instance(db, driver, f"vm-{i}", SOURCE, volumes=1)
             for i in (1, 2, 3)]
    crash(db, driver)
    return insts


def dests(summary):
    return [r["dest"] for r in summary["results"]]


def test_evacuate_host_auto(failed_host, db, driver):
    calls = []
    summary = _api().evacuate_host(SOURCE, progress=lambda *a: calls.append(a))
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (3, 3, 0)
    assert [r["name"] for r in summary["results"]] == ["vm-1", "vm-2", "vm-3"]
    assert {r["status"] for r in summary["results"]} == {"done"}
    assert set(dests(summary)) <= {SHARED, LOCAL}
    assert [(done, total) for done, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert [result for *_, result in calls] == summary["results"]
    assert db.get_host(RESERVED)["disabled"] is True
    for inst, dest in zip(failed_host, dests(summary)):
        assert db.get_instance(inst["uuid"])["host"] == dest
        assert guests(driver, dest).count((inst["uuid"], "running")) == 1


def test_evacuate_host_onto_reserved_hosts_only(failed_host, db, driver):
    summary = _api().evacuate_host(SOURCE, recovery_method="reserved_host",
                                   reserved_hosts=[RESERVED])
    host = db.get_host(RESERVED)
    assert (host["disabled"], host["disabled_reason"]) == (False, None)
    assert dests(summary) == [RESERVED, RESERVED, None]
    third = summary["results"][2]
    assert third["status"] == "refused" and "no valid host" in third["error"]
    assert (summary["succeeded"], summary["failed"]) == (2, 1)
    inst = db.get_instance(failed_host[2]["uuid"])
    assert (inst["host"], inst["task_state"], inst["vm_state"]) == (SOURCE, None, "active")
    assert driver.guests(SHARED) == driver.guests(LOCAL) == []


def test_evacuate_host_reserved_hosts_first(failed_host, db, driver):
    summary = _api().evacuate_host(SOURCE, recovery_method="rh_priority",
                                   reserved_hosts=[RESERVED])
    assert summary["succeeded"] == 3
    assert dests(summary)[:2] == [RESERVED, RESERVED]
    assert dests(summary)[2] in (SHARED, LOCAL)
    assert db.get_host(RESERVED)["disabled"] is False


def test_evacuate_host_one_failure_does_not_stop_the_others(failed_host, db, driver):
    bad = failed_host[1]["uuid"]
    driver.inject_fault("rebuild", instance=bad, message="image gone")
    summary = _api().evacuate_host(SOURCE)
    assert [r["status"] for r in summary["results"]] == ["done", "failed", "done"]
    failed = summary["results"][1]
    assert (failed["dest"], failed["migration"] is not None) == (None, True)
    assert "image gone" in failed["error"]
    inst = db.get_instance(bad)
    assert (inst["host"], inst["task_state"], inst["vm_state"]) == (SOURCE, None, "error")
    assert (summary["succeeded"], summary["failed"]) == (2, 1)


@pytest.mark.parametrize("host, kwargs, error, words", [
    ("host-z", {}, exc.HostNotFound, "host-z"),
    ("bad_host!", {}, exc.InvalidHostName, "malformed"),
    (SHARED, {}, exc.InvalidRequest, "source host host-b is up"),
    (SOURCE, {"recovery_method": "reserved_host"}, exc.InvalidRequest,
     "needs reserved_hosts"),
    (SOURCE, {"recovery_method": "pray"}, exc.InvalidRequest, "unknown recovery method"),
    (SOURCE, {"recovery_method": "rh_priority", "reserved_hosts": ["host-z"]},
     exc.HostNotFound, "host-z"),
    (SOURCE, {"recovery_method": "rh_priority", "reserved_hosts": RESERVED},
     exc.InvalidRequest, "list of host names"),
    (SOURCE, {"recovery_method": "rh_priority", "reserved_hosts": [SOURCE]},
     exc.InvalidRequest, "is the host to evacuate"),
    (SOURCE, {"reserved_hosts": [RESERVED]}, exc.InvalidRequest, "only used by"),
], ids=["unknown", "malformed", "host-up", "no-reserved", "bad-method",
        "unknown-reserved", "reserved-string", "reserved-is-source", "auto-reserved"])
def test_refused_host_evacuation_changes_nothing(host, kwargs, error, words,
                                                 failed_host, db, driver):
    uuid = failed_host[0]["uuid"]
    before = (snapshot(db, driver, uuid, ALL), db.list_hosts())
    with pytest.raises(error, match=words):
        _api().evacuate_host(host, **kwargs)
    assert (snapshot(db, driver, uuid, ALL), db.list_hosts()) == before
    assert db.list_migrations() == []
