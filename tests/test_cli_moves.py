"""The resize, cold-migration and host-state commands of ``migrateflow``,
run in-process against the fixtures' SQLite database and fake hypervisors
(no mocks)."""
import re

import pytest

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture
def flavors(run, small_cloud):
    # the small cloud's instance has flavor m2048
    for name, mem, cpus, disk in (("m2048", 2048, 2, 20), ("m4", 4096, 4, 40)):
        code, out, err = run("flavor-create", name, "--memory-mb", str(mem), "--vcpus",
                             str(cpus), "--disk-gb", str(disk))
        assert code == 0, err
    return small_cloud["instance"]["uuid"]


def test_flavors_and_quota(run, flavors, db):
    code, out, _ = run("flavor-list")
    assert code == 0 and "m4\t4096 MiB\t4 vCPUs\t40 GB" in out
    assert run("quota-set", "demo", "cores", "3")[0] == 0
    code, _, err = run("resize", flavors, "m4")
    assert code == 2 and "quota exceeded for project demo: cores would be 4, limit 3" in err
    assert db.get_instance(flavors)["task_state"] is None
    assert run("quota-set", "demo", "cores")[0] == 0
    assert db.quota_limits("demo") == {}


def test_resize_then_confirm(run, flavors, db, driver):
    code, out, err = run("resize", flavors, "m4", "--host", "host-c")
    assert code == 0, out + err
    mig = re.search(rf"migration ({UUID}) finished", out).group(1)
    assert "pre-migrating" in out and f"migrateflow resize-confirm {mig}" in out
    assert db.get_instance(flavors)["vm_state"] == "resized"
    code, out, err = run("resize-confirm", mig)
    assert code == 0 and f"migration {mig} confirmed" in out, out + err
    assert driver.guests("host-a") == []
    assert (db.get_instance(flavors)["vm_state"], db.get_instance(flavors)["host"]) == (
        "active", "host-c")


def test_migrate_then_revert(run, flavors, db, driver):
    code, out, err = run("migrate", flavors, "--host", "host-c")
    assert code == 0, out + err
    mig = re.search(rf"migration ({UUID}) finished", out).group(1)
    code, out, err = run("resize-revert", mig)
    assert code == 0 and f"migration {mig} reverted" in out and "on host-a" in out
    assert [g["state"] for g in driver.guests("host-a")] == ["running"]
    assert driver.guests("host-c") == []


def test_refused_requests_exit_2(run, flavors, db):
    code, _, err = run("resize", flavors, "m2048")
    assert code == 2 and "must change the flavor" in err
    code, _, err = run("migrate", flavors, "--host", "host-a")
    assert code == 2 and "must change host" in err
    code, _, err = run("resize-confirm", "no-such-migration")
    assert code == 2 and "not found" in err
    assert db.list_migrations() == []


def test_failed_resize_exits_1_with_the_reason(run, flavors, db, driver):
    driver.inject_fault("finish_migration", message="hypervisor said no")
    code, out, err = run("resize", flavors, "m4", "--host", "host-c")
    assert code == 1 and err.startswith("migration ") and "hypervisor said no" in err
    inst = db.get_instance(flavors)
    assert (inst["host"], inst["vm_state"], inst["flavor_name"]) == (
        "host-a", "active", "m2048")


def test_auto_confirm(run, flavors, db, conf):
    run("resize", flavors, "m4", "--host", "host-c")
    code, out, _ = run("resize-auto-confirm")
    assert code == 0 and "0 resize(s)" in out  # window 0: never
    conf.set_override("resize_confirm_window", 1)
    db.update_migration(db.list_migrations()[0]["uuid"], finished_at=0.0)
    code, out, _ = run("resize-auto-confirm")
    assert code == 0 and ": confirmed" in out and "1 resize(s)" in out


def test_host_set(run, small_cloud, db):
    code, out, _ = run("host-set", "host-b", "--state", "down", "--forced-down",
                       "--disable", "maintenance")
    assert code == 0, out
    host = db.get_host("host-b")
    assert (host["up"], host["forced_down"], host["disabled"], host["disabled_reason"]) == (
        False, True, True, "maintenance")
    assert run("host-set", "host-b", "--state", "up", "--no-forced-down", "--enable")[0] == 0
    host = db.get_host("host-b")
    assert (host["up"], host["forced_down"], host["disabled"]) == (True, False, False)
    assert run("host-set", "host-b")[0] == 2
    code, _, err = run("host-set", "bad_host!", "--enable")
    assert code == 2 and "malformed host name" in err
    assert run("host-set", "host-nope", "--enable")[0] == 2


def test_evacuate_a_dead_host_and_bring_it_back(run, small_cloud, db, driver):
    uuid = small_cloud["instance"]["uuid"]
    code, _, err = run("evacuate", uuid)
    assert code == 2 and "source host host-a is up" in err
    driver.crash_host("host-a")
    assert run("host-set", "host-a", "--state", "down", "--forced-down")[0] == 0
    code, out, err = run("host-evacuate", "host-a", "--recovery-method", "reserved_host",
                         "--reserved-host", "host-c")
    assert code == 0, out + err
    assert "[1/1] vm-1: done" in out and "1 of 1 instance(s) moved" in out
    assert db.get_instance(uuid)["host"] == "host-c"
    assert [g["state"] for g in driver.guests("host-c")] == ["running"]
    driver.set_host_up("host-a", True)
    code, out, err = run("host-started", "host-a")
    assert code == 0 and f"vm-1 ({uuid}): destroyed" in out, out + err
    assert driver.guests("host-a") == []
    assert db.list_migrations()[0]["status"] == "completed"


def test_host_evacuate_refuses_a_host_that_is_up(run, small_cloud, db):
    code, _, err = run("host-evacuate", "host-a")
    assert code == 2 and "is up" in err
    assert db.list_migrations() == []
