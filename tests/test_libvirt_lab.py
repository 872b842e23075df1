"""The libvirt driver on the real lab (tests/libvirt_lab.py): two libvirtd
daemons and QEMU (TCG) guests, moved by the real engine.

Each test records the two lab hosts in the state database with the facts
their hypervisors report, boots its guest, moves it through MigrationAPI,
and checks where the guest runs in BOTH daemons and what the database says
(tests/lab_checks.py).  A controller killed mid-copy:
tests/test_libvirt_lab_resume.py.
"""
import os
import time

import pytest

from lab_checks import (assert_runs_on_lab_b, assert_ticks_on, boot_instance,
                        escalate_at_once, ticks, vcpu_seconds, wait_for_ticks, where)
from libvirt_lab import add_lab_hosts
from migrateflow.tasks import convergence

#: each test takes seconds; the first one also waits for the lab to start
#: (a guest build and QEMU's capabilities probe on a fresh machine)
pytestmark = pytest.mark.timeout(240)


def test_live_migration_of_an_idle_guest(lab_cloud, libvirt_lab):
    """Block migration (each host its own instances directory) through the
    engine: the guest runs on lab-b only, keeps running, and the database
    follows."""
    db, driver, client = lab_cloud
    lab = libvirt_lab
    add_lab_hosts(db, driver)
    inst = boot_instance(db, driver, lab, lab.instances(), "idle-1")
    uuid = inst["uuid"]
    before = ticks(lab.console(lab.instances("lab-a"), uuid))

    mig = client.live_migrate(uuid, host="lab-b")

    assert mig["status"] == "completed", mig["error"]
    assert_runs_on_lab_b(lab, db, uuid)
    assert (mig["source_host"], mig["dest_host"]) == ("lab-a", "lab-b")
    assert mig["downtime_ms"] is not None and mig["memory_processed_mb"] > 0
    # the same guest goes on counting on lab-b, whose console is in its own
    # directory (a new file: it has not booted there)
    assert_ticks_on(lab, "lab-b", uuid, lab.console(lab.instances("lab-b"), uuid),
                    above=before, booted=0)
    assert not os.path.exists(os.path.join(lab.instances("lab-a"), uuid))


def start_stuck_copy(client, instance_uuid):
    """Start the live migration to lab-b; return its record once more than
    the guest's whole dirty set was sent (the copy goes round in circles)."""
    mig = client.live_migrate(instance_uuid, host="lab-b", wait=False)
    deadline = time.monotonic() + 45
    while True:
        seen = client.show_migration(mig["uuid"])
        if seen["status"] == "running" and seen["memory_processed_mb"] > 64:
            return seen
        assert seen["status"] in ("queued", "preparing", "running"), seen
        assert time.monotonic() < deadline, f"the copy did not get going: {seen}"
        time.sleep(0.2)


def test_abort_of_a_copy_that_cannot_converge(slow_shared_copy, libvirt_lab):
    """The operator's abort of a copy that cannot converge leaves the guest
    running on lab-a, and nothing on lab-b."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    uuid = boot_instance(db, driver, lab, lab.shared_instances, "dirty-1")["uuid"]

    mig = start_stuck_copy(client, uuid)
    client.abort(mig["uuid"])
    final = client.wait(mig["uuid"], timeout=60)

    assert final["status"] == "cancelled", final["error"]
    assert where(lab, uuid) == {"lab-a": ("running", True)}
    kept = db.get_instance(uuid)
    assert (kept["host"], kept["power_state"], kept["task_state"]) == \
        ("lab-a", "running", None)
    # the guest executes (not paused, not stopped) and goes on ticking
    # (under QEMU 7.2's TCG, about one abort in eight left it spinning)
    assert vcpu_seconds(lab, "lab-a", uuid, over=1.0) > 0.1
    assert_ticks_on(lab, "lab-a", uuid, lab.console(lab.shared_instances, uuid))


def test_force_complete_switches_to_post_copy(slow_shared_copy, libvirt_lab, lab_conf):
    """With post-copy permitted, forcing the stuck copy to complete switches
    it to post-copy: the guest runs on lab-b at once and the copy ends."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    lab_conf.set_override("live_migration_permit_post_copy", True, "migration")
    try:
        uuid = boot_instance(db, driver, lab, lab.shared_instances, "dirty-2")["uuid"]

        mig = start_stuck_copy(client, uuid)
        client.force_complete(mig["uuid"])
        final = client.wait(mig["uuid"], timeout=90)

        assert final["status"] == "completed", final["error"]
        assert final["post_copy"]
        assert where(lab, uuid) == {"lab-b": ("running", True)}
        assert db.get_instance(uuid)["host"] == "lab-b"
        assert_ticks_on(lab, "lab-b", uuid, lab.console(lab.shared_instances, uuid))
    finally:
        lab_conf.clear_override("live_migration_permit_post_copy", "migration")


def test_a_capped_copy_of_many_passes_delivers_the_guest_whole(slow_shared_copy, libvirt_lab,
                                                               lab_conf):
    """live_migration_bandwidth caps the copy of an idle guest at 4 MiB/s:
    it takes many passes over tens of seconds while the guest runs on, and
    the guest arrives whole (it goes on ticking on lab-b, and has not
    crashed and booted again)."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    lab_conf.set_override("live_migration_bandwidth", 4, "migration")
    uuid = boot_instance(db, driver, lab, lab.shared_instances, "capped-1")["uuid"]

    started = time.monotonic()
    final = client.live_migrate(uuid, host="lab-b")
    took = time.monotonic() - started

    assert final["status"] == "completed", final["error"]
    assert final["iteration"] >= 2 and took > 8, (final["iteration"], took)
    assert final["memory_processed_mb"] <= 4 * took * 1.25, (final, took)
    assert_runs_on_lab_b(lab, db, uuid, still_ticking=True)


def test_cold_migration_then_confirm(lab_cloud, libvirt_lab):
    """The guest is stopped, its instance directory copied to lab-b's, and
    started there from its own definition; confirm removes it from lab-a."""
    db, driver, client = lab_cloud
    lab = libvirt_lab
    add_lab_hosts(db, driver)
    inst = boot_instance(db, driver, lab, lab.instances(), "cold-1")
    uuid = inst["uuid"]

    mig = client.migrate(uuid, host="lab-b")

    assert mig["status"] == "finished", mig["error"]
    assert where(lab, uuid) == {"lab-a": ("shutoff", True), "lab-b": ("running", True)}
    wait_for_ticks(lab.console(lab.instances("lab-b"), uuid), 1)
    assert db.get_instance(uuid)["host"] == "lab-b"

    confirmed = client.confirm_resize(mig["uuid"])

    assert confirmed["status"] == "confirmed", confirmed["error"]
    assert where(lab, uuid) == {"lab-b": ("running", True)}
    assert not os.path.exists(os.path.join(lab.instances("lab-a"), uuid))
    assert os.path.isfile(os.path.join(lab.instances("lab-b"), uuid, "disk"))


# -- convergence escalation ------------------------------------------------------------------

def test_escalation_completes_a_copy_that_cannot_converge(slow_shared_copy, libvirt_lab,
                                                          lab_conf):
    """The guest dirties 64 MiB without pause, the copy moves 10 MiB/s: plain
    pre-copy never ends.  The engine sees it from the job statistics and
    climbs the ladder (downtime, auto-converge: not on for this job, then
    post-copy) long before the completion timeout (800 s/GiB)."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    overrides = escalate_at_once(lab_conf)
    try:
        uuid = boot_instance(db, driver, lab, lab.shared_instances, "dirty-3")["uuid"]

        started = time.monotonic()
        final = client.live_migrate(uuid, host="lab-b")
        took = time.monotonic() - started

        assert final["status"] == "completed", final["error"]
        assert final["post_copy"]
        # the source's job-completed event: post-copy stops the guest briefly
        assert final["downtime_ms"] is not None and final["downtime_ms"] < 1000
        note = final["scheduler_notes"][convergence.NOTE_KEY]
        rungs = [part.split(" ")[:2] for part in note.split(convergence.SEPARATOR)]
        assert rungs == [["max-downtime", "applied"], ["auto-converge", "skipped"],
                         ["post-copy", "applied"]], note
        assert took < 120, f"escalation took {took:.0f} s"
        assert_runs_on_lab_b(lab, db, uuid, still_ticking=True)
    finally:
        for name, _value in overrides:
            lab_conf.clear_override(name, "migration")


# -- rollback when the destination cannot be prepared -------------------------------------

def test_rollback_when_preparing_the_destination_fails(lab_cloud, libvirt_lab):
    """pre_live_migration on lab-b makes the instance directory and disk,
    then cannot write the instance's record there (a directory stands in
    its place): the flow rolls back, lab-b keeps nothing, the guest runs on
    lab-a as before."""
    db, driver, client = lab_cloud
    lab = libvirt_lab
    add_lab_hosts(db, driver)
    uuid = boot_instance(db, driver, lab, lab.instances(), "prep-1")["uuid"]
    dest_root = lab.instances("lab-b")
    record = os.path.join(dest_root, ".migrateflow", "lab-b", f"{uuid}.json")
    os.makedirs(record)

    mig = client.live_migrate(uuid, host="lab-b")

    assert mig["status"] == "failed", mig
    assert "pre-live-migration" in mig["error"], mig["error"]
    assert where(lab, uuid) == {"lab-a": ("running", True)}
    kept = db.get_instance(uuid)
    assert (kept["host"], kept["power_state"], kept["task_state"]) == \
        ("lab-a", "running", None)
    assert db.list_claims() == []
    # what the preparation made on lab-b is gone; lab-a's directory is intact
    assert not os.path.exists(os.path.join(dest_root, uuid))
    assert not os.path.exists(record)
    assert os.path.isfile(os.path.join(lab.instances("lab-a"), uuid, "disk"))
    assert_ticks_on(lab, "lab-a", uuid, lab.console(lab.instances("lab-a"), uuid))
