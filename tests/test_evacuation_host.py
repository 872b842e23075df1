"""Evacuation, continued: the dead host coming back during and after an
evacuation (it destroys only what the evacuation records name, never starts
an evacuated guest), refused requests, and a whole host's evacuation with
each recovery method.  Real TaskFlow engines, SQLite state, fake
hypervisors (the world: tests/evacuation_world.py).
"""
import functools
import threading

import pytest
from taskflow import states as tf_states
from taskflow.listeners import base as listener_base

from evacuation_world import (SOURCE, SHARED, LOCAL, DESTS, _api, crash, come_back, guests,
                             assert_evacuated, has_disk)
from helpers import snapshot, wait_until
from migrateflow import cloud
from migrateflow import exceptions as exc
from migrateflow.db import api as db_api


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
