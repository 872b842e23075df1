"""Bad resize, cold-migration, confirm and revert requests get a clear error
and change nothing (database, quota reservations and hypervisors);
concurrent requests for one instance have one winner."""
import threading

import pytest

from helpers import snapshot
from migrateflow import api, cloud
from migrateflow import exceptions as exc

HOSTS = ("host-a", "host-b", "host-c", "host-down")


@pytest.fixture
def lab(db, driver):
    cloud.add_host(db, driver, "host-a", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-b", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-c")
    cloud.add_host(db, driver, "host-down")
    db.update_host("host-down", up=False)
    db.create_flavor("m2", memory_mb=2048, vcpus=2, disk_gb=20)
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    db.create_flavor("m2-small-disk", memory_mb=2048, vcpus=2, disk_gb=10)
    db.create_flavor("huge", memory_mb=10 ** 6, vcpus=2, disk_gb=20)
    return cloud.add_instance(db, driver, "vm-1", "host-a", ports=2, volumes=1,
                              flavor_name="m2")


def _state(db, driver, uuid):
    return (snapshot(db, driver, uuid, HOSTS), db.list_quota_reservations(),
            db.list_migrations())


@pytest.mark.parametrize("request_, error, words", [
    (("resize", "m2", None), exc.InvalidRequest, "must change the flavor"),
    (("resize", "m2-small-disk", None), exc.InvalidRequest, "disks cannot shrink"),
    (("resize", "huge", None), exc.NoValidHost, "not enough memory"),
    (("resize", "m9", None), exc.FlavorNotFound, "'m9'"),
    (("resize", "", None), exc.InvalidRequest, "malformed flavor name"),
    (("resize", "m4", "host-a"), exc.InvalidRequest, "allow_resize_to_same_host"),
    (("resize", "m4", "host-down"), exc.HostUnavailable, "down"),
    (("resize", "m4", "host-nope"), exc.HostNotFound, "host-nope"),
    (("resize", "m4", "bad_host!"), exc.InvalidHostName, "malformed host name"),
    (("migrate", None, "host-a"), exc.InvalidRequest, "must change host"),
    (("migrate", None, "qemu+tcp://x/"), exc.InvalidHostName, "malformed host name"),
])
def test_refused_request_changes_nothing(lab, db, driver, request_, error, words):
    kind, flavor, host = request_
    before = _state(db, driver, lab["uuid"])
    with pytest.raises(error) as raised:
        if kind == "resize":
            api.MigrationAPI().resize(lab["uuid"], flavor, host=host)
        else:
            api.MigrationAPI().migrate(lab["uuid"], host=host)
    assert words in str(raised.value)
    assert _state(db, driver, lab["uuid"]) == before


def test_over_quota_changes_nothing(lab, db, driver):
    db.set_quota("demo", "cores", 3)
    before = _state(db, driver, lab["uuid"])
    with pytest.raises(exc.QuotaExceeded, match="cores would be 4, limit 3"):
        api.MigrationAPI().resize(lab["uuid"], "m4")
    assert _state(db, driver, lab["uuid"]) == before
    db.set_quota("demo", "cores", 4)
    assert api.MigrationAPI().resize(lab["uuid"], "m4")["status"] == "finished"


def test_unknown_instance_and_wrong_state(lab, db, driver):
    with pytest.raises(exc.InstanceNotFound):
        api.MigrationAPI().migrate("no-such-instance")
    db.update_instance(lab["uuid"], vm_state="error")
    before = _state(db, driver, lab["uuid"])
    with pytest.raises(exc.InstanceInvalidState, match="only an active or stopped"):
        api.MigrationAPI().resize(lab["uuid"], "m4")
    assert _state(db, driver, lab["uuid"]) == before


def test_source_host_down_is_refused(lab, db, driver):
    db.update_host("host-a", forced_down=True)
    before = _state(db, driver, lab["uuid"])
    with pytest.raises(exc.HostUnavailable, match="source host host-a is down"):
        api.MigrationAPI().migrate(lab["uuid"])
    assert _state(db, driver, lab["uuid"]) == before


def test_confirm_or_revert_of_an_unfinished_migration(lab, db, driver):
    live = api.MigrationAPI().live_migrate(lab["uuid"], "host-b")
    assert live["status"] == "completed"
    before = _state(db, driver, lab["uuid"])
    for call in (api.MigrationAPI().confirm_resize, api.MigrationAPI().revert_resize):
        with pytest.raises(exc.InvalidMigrationState, match="only a resize or cold"):
            call(live["uuid"])
        with pytest.raises(exc.MigrationNotFound):
            call("no-such-migration")
    assert _state(db, driver, lab["uuid"]) == before


def test_confirm_twice_and_revert_after_confirm(lab, db, driver):
    mig = api.MigrationAPI().resize(lab["uuid"], "m4", host="host-c")
    assert api.MigrationAPI().confirm_resize(mig["uuid"])["status"] == "confirmed"
    before = _state(db, driver, lab["uuid"])
    for call in (api.MigrationAPI().confirm_resize, api.MigrationAPI().revert_resize):
        with pytest.raises(exc.InvalidMigrationState,
                           match="is confirmed: only a finished"):
            call(mig["uuid"])
    assert _state(db, driver, lab["uuid"]) == before


def test_confirm_of_a_resize_in_error(lab, db, driver):
    driver.inject_fault("finish_migration", message="no")
    mig = api.MigrationAPI().resize(lab["uuid"], "m4", host="host-c")
    assert mig["status"] == "error"
    with pytest.raises(exc.InvalidMigrationState, match="is error"):
        api.MigrationAPI().confirm_resize(mig["uuid"])


def test_concurrent_resizes_one_winner(lab, db, driver):
    results = []
    barrier = threading.Barrier(6)

    def attempt():
        barrier.wait()
        try:
            results.append(api.MigrationAPI().resize(lab["uuid"], "m4")["status"])
        except exc.InstanceBusy as err:
            results.append(type(err).__name__)
        except exc.InvalidRequest as err:  # refused after the winner changed the state
            results.append(type(err).__name__)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("finished") == 1, results
    assert len(db.list_migrations()) == 1
    assert db.list_claims() == []


def test_concurrent_confirm_and_revert_one_winner(lab, db, driver):
    mig = api.MigrationAPI().resize(lab["uuid"], "m4", host="host-c")
    results = []
    barrier = threading.Barrier(2)

    def attempt(call):
        barrier.wait()
        try:
            results.append(call(mig["uuid"])["status"])
        except exc.InvalidRequest as err:
            results.append(type(err).__name__)

    threads = [threading.Thread(target=attempt, args=(c,)) for c in (
        api.MigrationAPI().confirm_resize, api.MigrationAPI().revert_resize)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) in (["InvalidMigrationState", "confirmed"],
                               ["InvalidMigrationState", "reverted"],
                               ["InstanceBusy", "confirmed"])
    final = db.get_migration(mig["uuid"])["status"]
    assert final in ("confirmed", "reverted")
