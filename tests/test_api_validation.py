"""Bad requests get a clear error and change nothing (database and
hypervisors), and concurrent requests for one instance have one winner."""
import threading

import pytest

from helpers import snapshot
from migrateflow import api, cloud
from migrateflow import exceptions as exc


@pytest.fixture
def lab(db, driver):
    """host-a, host-b share storage; host-c local; odd hosts for each rule."""
    cloud.add_host(db, driver, "host-a", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-b", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-c")
    cloud.add_host(db, driver, "host-small", memory_mb=1024)
    cloud.add_host(db, driver, "host-xen", hypervisor_type="Xen")
    cloud.add_host(db, driver, "host-old", hypervisor_version=6000000)
    cloud.add_host(db, driver, "host-oldcpu", cpu_model="Westmere",
                   cpu_features=["sse4_2", "aes"])
    cloud.add_host(db, driver, "host-down")
    db.update_host("host-down", up=False)
    cloud.add_host(db, driver, "host-off")
    db.update_host("host-off", disabled=True, disabled_reason="maintenance")
    inst = cloud.add_instance(db, driver, "vm-1", "host-a", ports=2, volumes=1)
    return inst


ALL_HOSTS = ("host-a", "host-b", "host-c", "host-small", "host-xen", "host-old",
             "host-oldcpu", "host-down", "host-off")


@pytest.mark.parametrize("host, block_migration, error, words", [
    ("host-nope", None, exc.HostNotFound, "host-nope"),
    ("host-a", None, exc.InvalidRequest, "current host"),
    ("host-down", None, exc.HostUnavailable, "down"),
    ("host-off", None, exc.HostUnavailable, "disabled: maintenance"),
    ("host-b", True, exc.InvalidSharedStorage, "share instance storage"),
    ("host-c", False, exc.InvalidLocalStorage, "block migration is required"),
    ("host-small", None, exc.InsufficientResources, "not enough memory"),
    ("host-xen", None, exc.HypervisorMismatch, "hypervisor type mismatch"),
    ("host-old", None, exc.HypervisorMismatch, "older than source"),
    ("host-oldcpu", None, exc.CPUIncompatible, "avx"),
    ("bad_host!", None, exc.InvalidHostName, "malformed host name"),
    ("-leading-hyphen", None, exc.InvalidHostName, "malformed host name"),
    ("a" * 64, None, exc.InvalidHostName, "malformed host name"),
    ("host a", None, exc.InvalidHostName, "malformed host name"),
    ("../../etc", None, exc.InvalidHostName, "malformed host name"),
    ("qemu+tcp://evil/system", None, exc.InvalidHostName, "malformed host name"),
])
def test_refused_destination_changes_nothing(lab, db, driver, host, block_migration,
                                             error, words):
    before = snapshot(db, driver, lab["uuid"], ALL_HOSTS)
    with pytest.raises(error) as raised:
        api.MigrationAPI().live_migrate(lab["uuid"], host, block_migration=block_migration)
    assert words in str(raised.value)
    assert snapshot(db, driver, lab["uuid"], ALL_HOSTS) == before
    assert db.list_migrations() == []


def test_unknown_instance(lab, db):
    with pytest.raises(exc.InstanceNotFound, match="no-such-vm"):
        api.MigrationAPI().live_migrate("no-such-vm", "host-b")
    assert db.list_migrations() == []


@pytest.mark.parametrize("values, error, words", [
    ({"vm_state": "stopped", "power_state": "shutdown"}, exc.InstanceInvalidState,
     "active and running"),
    ({"task_state": "resize_prep"}, exc.InstanceBusy, "busy"),
])
def test_instance_in_wrong_state(lab, db, driver, values, error, words):
    db.update_instance(lab["uuid"], **values)
    before = snapshot(db, driver, lab["uuid"], ALL_HOSTS)
    with pytest.raises(error, match=words):
        api.MigrationAPI().live_migrate(lab["uuid"], "host-b")
    assert snapshot(db, driver, lab["uuid"], ALL_HOSTS) == before
    assert db.list_migrations() == []


def test_source_host_down(lab, db, driver):
    db.update_host("host-a", up=False)
    before = snapshot(db, driver, lab["uuid"], ALL_HOSTS)
    with pytest.raises(exc.HostUnavailable, match="source host host-a is down"):
        api.MigrationAPI().live_migrate(lab["uuid"], "host-b")
    assert snapshot(db, driver, lab["uuid"], ALL_HOSTS) == before


def test_no_valid_host_lists_every_reason(db, driver):
    cloud.add_host(db, driver, "host-a")
    cloud.add_host(db, driver, "host-small", memory_mb=1024)
    cloud.add_host(db, driver, "host-xen", hypervisor_type="Xen")
    inst = cloud.add_instance(db, driver, "vm-1", "host-a")
    with pytest.raises(exc.NoValidHost) as raised:
        api.MigrationAPI().live_migrate(inst["uuid"])
    assert "host-small: not enough memory" in str(raised.value)
    assert "host-xen: hypervisor type mismatch" in str(raised.value)
    assert db.list_migrations() == []


def test_concurrent_claims_have_exactly_one_winner(lab, db):
    results = []
    barrier = threading.Barrier(8)

    def claim():
        barrier.wait()
        try:
            db.start_migration(lab["uuid"], migration_type="live-migration",
                               task_state="migrating", source_host="host-a")
            results.append("won")
        except exc.InstanceBusy:
            results.append("busy")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["busy"] * 7 + ["won"]
    assert len(db.list_migrations()) == 1


def test_second_request_while_first_runs_is_refused(lab, db, driver):
    # the first migration's copy makes no progress until the fault is cleared
    driver.inject_fault("get_migration_job", action="hang", instance=lab["uuid"], count=-1)
    client = api.MigrationAPI()
    first = client.live_migrate(lab["uuid"], "host-b", wait=False)
    for _ in range(3000):
        if db.get_migration(first["uuid"])["status"] == "running":
            break
        threading.Event().wait(0.01)
    with pytest.raises(exc.InstanceBusy, match="busy"):
        client.live_migrate(lab["uuid"], "host-c")
    driver.clear_faults()
    mig = client.wait(first["uuid"], timeout=120)
    assert mig["status"] == "completed"
    assert db.get_instance(lab["uuid"])["host"] == "host-b"
    assert len(db.list_migrations()) == 1
