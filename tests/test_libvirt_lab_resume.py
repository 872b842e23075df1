"""The libvirt lab (tests/libvirt_lab.py) with a controller killed while
the copy runs: a controller process of its own starts the live migration
and is SIGKILLed mid-copy; libvirt carries the (peer-to-peer) job on, and
this process resumes the flow.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab_checks import (assert_runs_on_lab_b, assert_ticks_on, boot_instance,
                        escalate_at_once, vcpu_seconds, where)
from migrateflow import conf as mf_conf
from migrateflow.db import api as db_api
from migrateflow.tasks import convergence

#: each test takes seconds; the first one also waits for the lab to start
pytestmark = pytest.mark.timeout(240)


#: a controller of its own: runs one live migration with the given configuration
CONTROLLER = r"""
import json, logging, sys
from migrateflow.conf import CONF
from migrateflow import api
logging.basicConfig(level=logging.INFO)
overrides, instance, dest = json.loads(sys.argv[1])
for name, value, group in overrides:
    CONF.set_override(name, value, group=group)
api.MigrationAPI(CONF).live_migrate(instance, host=dest)
"""


def conf_overrides(conf):
    """(name, value, group) of every migrateflow option as ``conf`` has it,
    for a controller in another process."""
    found = []
    for group, opts in mf_conf.list_opts():
        name = getattr(group, "name", group)
        section = conf if name == "DEFAULT" else conf[name]
        for opt in opts:
            value = section[opt.dest]
            try:
                json.dumps(value)
            except TypeError:
                continue
            found.append((opt.dest, value, None if name == "DEFAULT" else name))
    return found


def job_running_on(lab, host, instance_uuid):
    """libvirt (a connection of this test) shows an outgoing job of the guest."""
    import libvirt
    conn = libvirt.open(lab.uri(host))
    try:
        stats = conn.lookupByUUIDString(instance_uuid).jobStats()
        return stats.get("type") in (libvirt.VIR_DOMAIN_JOB_BOUNDED,
                                     libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    finally:
        conn.close()


def kill_controller_mid_copy(lab_conf, lab, db, instance_uuid, log_path, above_mb):
    """Start the live migration to lab-b in a controller process of its
    own, SIGKILL it (by its pid) once the copy sent more than ``above_mb``;
    returns the migration record as the dead controller left it."""
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", CONTROLLER,
             json.dumps([conf_overrides(lab_conf), instance_uuid, "lab-b"])],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            mig = wait_for_copy(db, instance_uuid, child, above_mb)
        finally:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    killed = db.get_migration(mig["uuid"])
    assert (killed["status"], killed["current_step"]) == ("running", "live-migration")
    # the job outlived its controller (peer-to-peer)
    assert job_running_on(lab, "lab-a", instance_uuid)
    return killed


def test_controller_killed_mid_copy_is_resumed_and_finishes(slow_shared_copy, libvirt_lab,
                                                            lab_conf, tmp_path):
    """A controller process starts the (peer-to-peer) copy of an idle guest
    at 2 MiB/s and is killed with SIGKILL while it runs.  libvirt carries the
    job on; the resumed flow's live-migration step re-attaches to it (or
    finds the move done), the post steps run, and both daemons and the
    database agree the guest runs on lab-b."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    lab_conf.set_override("live_migration_bandwidth", 2, "migration")
    uuid = boot_instance(db, driver, lab, lab.shared_instances, "killed-1")["uuid"]
    killed = kill_controller_mid_copy(lab_conf, lab, db, uuid, tmp_path / "controller.log",
                                      above_mb=4)
    # this process's driver, which did not start the job, sees it running
    inst = db_api.instance_to_driver(db.get_instance(uuid))
    seen = driver.get_migration_job("lab-a", inst)
    assert seen["status"] == "running" and seen["memory_processed_mb"] > 0

    final = client.resume(killed["uuid"])

    assert final["status"] == "completed", final["error"]
    assert final["owner"].endswith(f":{os.getpid()}")
    assert final["memory_processed_mb"] >= killed["memory_processed_mb"]
    assert_runs_on_lab_b(lab, db, uuid, still_ticking=True)


def test_resumed_flow_escalates_a_copy_another_controller_started(
        slow_shared_copy, libvirt_lab, lab_conf, tmp_path):
    """The controller of a copy that cannot converge dies during its first
    pass; the resumed step re-attaches and its escalation switches the job
    it did not start to post-copy (migrateStartPostCopy from another
    process): the guest ends on lab-b."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    overrides = escalate_at_once(lab_conf)
    try:
        uuid = boot_instance(db, driver, lab, lab.shared_instances, "dirty-killed-2")["uuid"]
        killed = kill_controller_mid_copy(lab_conf, lab, db, uuid,
                                          tmp_path / "controller.log", above_mb=8)

        final = client.resume(killed["uuid"])

        assert final["status"] == "completed", final["error"]
        assert final["post_copy"]
        assert "post-copy applied" in final["scheduler_notes"][convergence.NOTE_KEY]
        assert_runs_on_lab_b(lab, db, uuid)
    finally:
        for name, _value in overrides:
            lab_conf.clear_override(name, "migration")


def test_operator_abort_of_a_copy_whose_controller_died(slow_shared_copy, libvirt_lab,
                                                        lab_conf, tmp_path):
    """The controller dies during a copy that cannot converge; the operator
    aborts the migration, and the resumed step aborts the job another
    process started (abortJob): the guest runs on lab-a only, the migration
    is cancelled."""
    db, driver, client = slow_shared_copy
    lab = libvirt_lab
    uuid = boot_instance(db, driver, lab, lab.shared_instances, "dirty-killed-3")["uuid"]
    killed = kill_controller_mid_copy(lab_conf, lab, db, uuid, tmp_path / "controller.log",
                                      above_mb=8)
    client.abort(killed["uuid"])

    final = client.resume(killed["uuid"])

    assert final["status"] == "cancelled", final["error"]
    assert where(lab, uuid) == {"lab-a": ("running", True)}
    kept = db.get_instance(uuid)
    assert (kept["host"], kept["power_state"], kept["task_state"]) == \
        ("lab-a", "running", None)
    assert not job_running_on(lab, "lab-a", uuid)
    assert vcpu_seconds(lab, "lab-a", uuid, over=1.0) > 0.1
    assert_ticks_on(lab, "lab-a", uuid, lab.console(lab.shared_instances, uuid))


def wait_for_copy(db, instance_uuid, child, above_mb, timeout=90):
    """The instance's migration once its copy sent more than ``above_mb``."""
    deadline = time.monotonic() + timeout
    while True:
        migs = db.list_migrations(instance_uuid)
        mig = migs[-1] if migs else None
        if mig and mig["status"] == "running" and mig["memory_processed_mb"] > above_mb:
            return mig
        assert child.poll() is None, f"the controller ended early ({child.returncode})"
        assert mig is None or mig["status"] in ("queued", "preparing", "running"), mig
        assert time.monotonic() < deadline, f"the copy did not get going: {mig}"
        time.sleep(0.1)
