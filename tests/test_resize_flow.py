"""Cold migration, resize, confirm and revert end to end: real TaskFlow
engine, SQLite state and flow persistence, fake hypervisors.  Every test
asserts the end state in the database and in the fake driver."""
import time

import pytest

from helpers import CaptureFactory, fail_after_execute, fail_instead_of_execute, snapshot
from migrateflow import api, cloud
from migrateflow.flows import confirm_resize, resize, revert_resize
from migrateflow.tasks import resize_checks, resize_confirm, resize_move

OLD = {"name": "m2", "memory_mb": 2048, "vcpus": 2, "disk_gb": 20}
NEW = {"name": "m4", "memory_mb": 4096, "vcpus": 4, "disk_gb": 40}

RESIZE_STEPS = [
    "start-resize", "check-instance-for-resize", "check-resize-candidate",
    "claim-resize-resources", "check-shared-storage", "migrate-disk-and-power-off",
    "terminate-source-volume-connections", "connect-destination-volumes",
    "migrate-ports-to-destination", "finish-migration", "finish-resize",
]
#: steps made to fail through the fake driver: (method, before/after)
DRIVER_FAULTS = {
    "check-instance-for-resize": ("get_guest", "before"),
    "check-shared-storage": ("check_instance_shared_storage", "before"),
    "migrate-disk-and-power-off": ("migrate_disk_and_power_off", "after"),
    "finish-migration": ("finish_migration", "after"),
    "confirm-migration-at-source": ("confirm_migration", "before"),
    "finish-revert-migration": ("finish_revert_migration", "before"),
}
#: steps made to fail after their own database work
DB_STEPS = {
    "start-resize": resize_checks.StartResize,
    "check-resize-candidate": resize_checks.CheckResizeCandidate,
    "claim-resize-resources": resize_checks.ClaimResizeResources,
    "terminate-source-volume-connections": resize_move.TerminateSourceVolumeConnections,
    "connect-destination-volumes": resize_move.ConnectDestinationVolumes,
    "migrate-ports-to-destination": resize_move.MigratePortsToDestination,
    "start-confirm-resize": resize_confirm.StartConfirmResize,
    "start-revert-resize": resize_confirm.StartRevertResize,
    "check-revert-resize": resize_confirm.CheckRevertResize,
    "revert-ports-to-source": resize_confirm.RevertPortsToSource,
    "revert-volumes-to-source": resize_confirm.RevertVolumesToSource,
}
#: single-transaction steps: a failure means nothing was committed
ATOMIC_STEPS = {
    "finish-resize": resize_move.FinishResize,
    "complete-confirm-resize": resize_confirm.CompleteConfirmResize,
    "complete-revert-resize": resize_confirm.CompleteRevertResize,
}


@pytest.fixture
def flavors(db):
    db.create_flavor("m2", memory_mb=2048, vcpus=2, disk_gb=20)
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    db.create_flavor("m1", memory_mb=1024, vcpus=1, disk_gb=10)
    db.create_flavor("m2-big-disk", memory_mb=2048, vcpus=1, disk_gb=30)
    db.create_flavor("huge", memory_mb=10 ** 6, vcpus=2, disk_gb=20)


@pytest.fixture
def vm(db, driver, flavors):
    """host-a and host-b share storage, host-c is local; vm-1 (m2, two
    ports, one volume) runs on host-a."""
    cloud.add_host(db, driver, "host-a", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-b", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-c")
    return cloud.add_instance(db, driver, "vm-1", "host-a", ports=2, volumes=1,
                              flavor_name="m2")


def _api(capture=None):
    return api.MigrationAPI(listeners=[capture] if capture else [])


def _inject(step, monkeypatch, driver, inst_uuid):
    if step in DRIVER_FAULTS:
        method, when = DRIVER_FAULTS[step]
        driver.inject_fault(method, instance=inst_uuid, when=when,
                            message=f"injected fault in {step}")
    elif step in ATOMIC_STEPS:
        fail_instead_of_execute(monkeypatch, ATOMIC_STEPS[step])
    else:
        fail_after_execute(monkeypatch, DB_STEPS[step])


def _usage(db):
    return {h["name"]: (h["memory_used_mb"], h["vcpus_used"], h["disk_used_gb"])
            for h in db.list_hosts()}


def _guest_flavor(driver, host, uuid):
    return next(((g["memory_mb"], g["vcpus"], g["disk_gb"], g["state"])
                 for g in driver.guests(host) if g["uuid"] == uuid), None)


def _assert_attached(db, driver, uuid, host, others):
    """Ports bound, volumes connected and VIFs plugged on ``host`` only."""
    ports = {p["id"] for p in db.list_ports(uuid)}
    assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(uuid)} \
        == {(p, host, "ACTIVE") for p in ports}
    volumes = {b["volume_id"] for b in db.list_block_devices(uuid)}
    assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(uuid)} \
        == {(v, host) for v in volumes}
    assert {v["port_id"] for v in driver.vifs(host)} == ports
    assert {v["volume_id"] for v in driver.volume_connections(host)} == volumes
    for other in others:
        assert driver.vifs(other) == [] and driver.volume_connections(other) == []


def _assert_resized(db, driver, inst, mig, dest, power="running"):
    uuid = inst["uuid"]
    assert (mig["status"], mig["dest_host"], mig["error"]) == ("finished", dest, None)
    got = db.get_instance(uuid)
    assert (got["host"], got["vm_state"], got["task_state"], got["power_state"],
            got["flavor_name"], got["memory_mb"], got["vcpus"]) == (
        dest, "resized", None, power, "m4", 4096, 4)
    assert _guest_flavor(driver, dest, uuid) == (4096, 4, 40, power)
    # the source keeps its stopped guest with the old flavor until confirm/revert
    assert _guest_flavor(driver, "host-a", uuid) == (2048, 2, 20, "shutdown")
    _assert_attached(db, driver, uuid, dest, ["host-a"])
    assert db.list_claims() == []


def test_flows_declare_exact_requirements():
    for module in (resize, confirm_resize, revert_resize):
        flow = module.build()
        assert set(flow.requires) == set(module.REQUIRES), module.NAME
        names = [atom.name for atom, _ in flow.iter_nodes()]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("dest", ["host-b", "host-c"])
def test_resize_then_confirm(dest, vm, db, driver):
    mig = _api().resize(vm["uuid"], "m4", host=dest)
    assert mig["migration_type"] == "resize"
    assert (mig["old_flavor"], mig["new_flavor"]) == (OLD, NEW)
    _assert_resized(db, driver, vm, mig, dest)
    # the source still holds the old flavor, the destination the new one
    usage = _usage(db)
    assert usage["host-a"] == (2048, 2, 20) and usage[dest] == (4096, 4, 40)
    # until confirm the project is charged max(old, new)
    assert db.quota_usage("demo") == {"instances": 1, "cores": 4, "ram_mb": 4096}

    done = _api().confirm_resize(mig["uuid"])
    assert (done["status"], done["error"], done["source_held"]) == ("confirmed", None, False)
    got = db.get_instance(vm["uuid"])
    assert (got["host"], got["vm_state"], got["task_state"], got["flavor_name"]) == (
        dest, "active", None, "m4")
    assert driver.guests("host-a") == []
    assert _guest_flavor(driver, dest, vm["uuid"]) == (4096, 4, 40, "running")
    assert _usage(db)["host-a"] == (0, 0, 0) and _usage(db)[dest] == (4096, 4, 40)
    assert db.list_quota_reservations() == []
    # a shared disk stays (it is the destination's), a local copy on the source goes
    assert bool(driver.files("host-a")) is (dest == "host-b")
    _assert_attached(db, driver, vm["uuid"], dest, ["host-a"])


@pytest.mark.parametrize("dest", ["host-b", "host-c"])
def test_resize_then_revert(dest, vm, db, driver):
    before = snapshot(db, driver, vm["uuid"])
    mig = _api().resize(vm["uuid"], "m4", host=dest)
    _assert_resized(db, driver, vm, mig, dest)
    done = _api().revert_resize(mig["uuid"])
    assert (done["status"], done["error"]) == ("reverted", None)
    assert snapshot(db, driver, vm["uuid"]) == before
    assert db.list_quota_reservations() == []


def test_cold_migration_keeps_the_flavor(vm, db, driver):
    mig = _api().migrate(vm["uuid"])
    assert mig["migration_type"] == "migration" and mig["status"] == "finished"
    dest = mig["dest_host"]
    assert dest in ("host-b", "host-c")
    got = db.get_instance(vm["uuid"])
    assert (got["host"], got["vm_state"], got["flavor_name"]) == (dest, "resized", "m2")
    assert _guest_flavor(driver, dest, vm["uuid"]) == (2048, 2, 20, "running")
    assert _api().confirm_resize(mig["uuid"])["status"] == "confirmed"
    assert driver.guests("host-a") == []
    assert db.get_instance(vm["uuid"])["vm_state"] == "active"


def test_a_stopped_instance_stays_stopped(vm, db, driver):
    driver.power_off("host-a", {"uuid": vm["uuid"]})
    db.update_instance(vm["uuid"], vm_state="stopped", power_state="shutdown")
    mig = _api().resize(vm["uuid"], "m4", host="host-c")
    _assert_resized(db, driver, vm, mig, "host-c", power="shutdown")
    _api().confirm_resize(mig["uuid"])
    got = db.get_instance(vm["uuid"])
    assert (got["vm_state"], got["power_state"]) == ("stopped", "shutdown")
    assert _guest_flavor(driver, "host-c", vm["uuid"])[3] == "shutdown"


def test_downsize_holds_the_old_flavor_until_confirm(vm, db, driver):
    mig = _api().resize(vm["uuid"], "m2-big-disk", host="host-c")
    assert mig["status"] == "finished"
    # a revert must fit: the old flavor's 2 cores are still charged
    assert db.quota_usage("demo")["cores"] == 2
    _api().confirm_resize(mig["uuid"])
    assert db.quota_usage("demo")["cores"] == 1


@pytest.mark.parametrize("step", RESIZE_STEPS)
@pytest.mark.parametrize("dest", ["host-b", "host-c"])
def test_failure_at_each_resize_step_rolls_back(step, dest, vm, db, driver, monkeypatch):
    before = snapshot(db, driver, vm["uuid"])
    _inject(step, monkeypatch, driver, vm["uuid"])
    capture = CaptureFactory()
    mig = _api(capture).resize(vm["uuid"], "m4", host=dest)

    assert mig["status"] == "error"
    assert step in mig["error"] and "injected" in mig["error"]
    cap = capture.last
    assert cap.failed() == [step]
    assert cap.reverted() == [step] + list(reversed(cap.executed()))
    assert snapshot(db, driver, vm["uuid"]) == before
    assert db.list_quota_reservations() == [] and db.list_claims() == []
    assert _guest_flavor(driver, "host-a", vm["uuid"]) == (2048, 2, 20, "running")
    _assert_attached(db, driver, vm["uuid"], "host-a", ["host-b", "host-c"])


def test_retry_on_the_next_candidate(vm, db, driver):
    first = _api()._resize_candidates(db.get_instance(vm["uuid"]), NEW,
                                      db.get_host("host-a"), None, True)[0][0]
    driver.inject_fault("check_instance_shared_storage", host="host-a",
                        message="probe failed")
    mig = _api().resize(vm["uuid"], "m4")
    assert mig["status"] == "finished" and mig["dest_host"] != first
    assert "probe failed" in mig["scheduler_notes"][first]
    _assert_resized(db, driver, vm, mig, mig["dest_host"])


def test_all_candidates_fail(vm, db, driver):
    before = snapshot(db, driver, vm["uuid"])
    driver.inject_fault("check_instance_shared_storage", count=-1, message="no probe")
    mig = _api().resize(vm["uuid"], "m4")
    assert mig["status"] == "error" and "no valid host" in mig["error"]
    assert "host-b" in mig["error"] and "host-c" in mig["error"]
    assert snapshot(db, driver, vm["uuid"]) == before


@pytest.mark.parametrize("step", ["start-confirm-resize", "check-shared-storage",
                                  "confirm-migration-at-source", "complete-confirm-resize"])
def test_failure_at_each_confirm_step_keeps_the_resize(step, vm, db, driver, monkeypatch):
    mig = _api().resize(vm["uuid"], "m4", host="host-c")
    _inject(step, monkeypatch, driver, vm["uuid"])
    got = _api().confirm_resize(mig["uuid"])
    assert got["status"] == "finished" and step in got["error"]
    assert db.get_instance(vm["uuid"])["vm_state"] == "resized"
    assert _guest_flavor(driver, "host-c", vm["uuid"]) == (4096, 4, 40, "running")
    monkeypatch.undo()
    driver.clear_faults()
    # asking again finishes the job, whatever the failed attempt already did
    assert _api().confirm_resize(mig["uuid"])["status"] == "confirmed"
    assert driver.guests("host-a") == [] and _usage(db)["host-a"] == (0, 0, 0)


@pytest.mark.parametrize("step", ["start-revert-resize", "check-revert-resize",
                                  "revert-ports-to-source", "revert-volumes-to-source",
                                  "complete-revert-resize"])
def test_failure_before_the_hypervisors_keeps_the_resize(step, vm, db, driver,
                                                          monkeypatch):
    mig = _api().resize(vm["uuid"], "m4", host="host-c")
    resized = snapshot(db, driver, vm["uuid"])
    _inject(step, monkeypatch, driver, vm["uuid"])
    got = _api().revert_resize(mig["uuid"])
    if step == "complete-revert-resize":
        # the hypervisors were reverted: only the record could not be written
        assert got["status"] == "error" and step in got["error"]
        assert db.get_instance(vm["uuid"])["vm_state"] == "error"
        return
    assert got["status"] == "finished" and step in got["error"]
    assert snapshot(db, driver, vm["uuid"]) == resized
    monkeypatch.undo()
    assert _api().revert_resize(mig["uuid"])["status"] == "reverted"
    _assert_attached(db, driver, vm["uuid"], "host-a", ["host-c"])


def test_failed_revert_on_the_hypervisors_is_error(vm, db, driver):
    mig = _api().resize(vm["uuid"], "m4", host="host-c")
    driver.inject_fault("finish_revert_migration", message="hypervisor lost")
    got = _api().revert_resize(mig["uuid"])
    assert got["status"] == "error" and "hypervisor lost" in got["error"]
    inst = db.get_instance(vm["uuid"])
    assert (inst["vm_state"], inst["task_state"]) == ("error", None)
    # an error is never confirmed: that could destroy the last copy
    with pytest.raises(api.exc.InvalidMigrationState):
        _api().confirm_resize(mig["uuid"])


def test_auto_confirm_after_the_window(vm, db, driver, conf):
    mig = _api().resize(vm["uuid"], "m4", host="host-c")
    assert _api().confirm_expired_resizes() == []  # window 0: never
    conf.set_override("resize_confirm_window", 60)
    assert _api().confirm_expired_resizes() == []  # not expired yet
    assert _api().confirm_expired_resizes(now=time.time() + 61) == [
        (mig["uuid"], "confirmed")]
    assert driver.guests("host-a") == []
    assert db.get_instance(vm["uuid"])["vm_state"] == "active"


@pytest.mark.parametrize("ending", ["confirm", "revert"])
def test_resize_to_the_same_host(ending, vm, db, driver, conf):
    conf.set_override("allow_resize_to_same_host", True)
    before = snapshot(db, driver, vm["uuid"])
    mig = _api().resize(vm["uuid"], "m4", host="host-a")
    assert (mig["status"], mig["dest_host"]) == ("finished", "host-a")
    assert _guest_flavor(driver, "host-a", vm["uuid"]) == (4096, 4, 40, "running")
    # old and new flavor both held on the host until confirm or revert
    assert _usage(db)["host-a"] == (6144, 6, 60)
    if ending == "confirm":
        assert _api().confirm_resize(mig["uuid"])["status"] == "confirmed"
        assert _usage(db)["host-a"] == (4096, 4, 40)
        assert _guest_flavor(driver, "host-a", vm["uuid"]) == (4096, 4, 40, "running")
        assert db.get_instance(vm["uuid"])["flavor_name"] == "m4"
    else:
        assert _api().revert_resize(mig["uuid"])["status"] == "reverted"
        assert snapshot(db, driver, vm["uuid"]) == before
    _assert_attached(db, driver, vm["uuid"], "host-a", ["host-b", "host-c"])
