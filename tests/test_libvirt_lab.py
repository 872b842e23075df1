"""The libvirt driver on the real lab (tests/libvirt_lab.py): two libvirtd
daemons and QEMU (TCG) guests, moved by the real engine.

Each test records the two lab hosts in the state database with the facts
their hypervisors report, boots its guest, moves it through MigrationAPI,
and checks where the guest runs in BOTH daemons and what the database says.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from migrateflow import api, cloud, drivers
from migrateflow import conf as mf_conf
from migrateflow.db import api as db_api
from migrateflow.tasks import convergence

#: each test takes seconds; the first one also waits for the lab to start
#: (a guest build and QEMU's capabilities probe on a fresh machine)
pytestmark = pytest.mark.timeout(240)
LAB_HOSTS = ("lab-a", "lab-b")
#: a TCG guest boots in 3-5 s and ticks every second; on a loaded machine
#: (other jobs on its two cores) it can be several times slower
BOOT_TIMEOUT_S = 90
#: a guest that moved prints its next tick within this (45 s once was not
#: enough under load: see guest_report in the failure for why)
TICK_TIMEOUT_S = 90


def add_lab_hosts(db, driver, shared_storage=None):
    """Host rows as a cloud would record them: the hypervisors' own facts."""
    for name in LAB_HOSTS:
        cloud.record_host(db, driver, name, vcpus=8, shared_storage=shared_storage)


def ticks(console):
    """The last "tick N" the guest printed on its serial console (0: none)."""
    try:
        with open(console, errors="replace") as f:
            found = re.findall(r"tick (\d+)", f.read())
    except FileNotFoundError:
        return 0
    return int(found[-1]) if found else 0


def boots(console):
    """How many times the guest booted on this console ("GUEST UP"): a
    guest that crashed on arrival (panic=-1) boots again and ticks anew."""
    try:
        with open(console, errors="replace") as f:
            return f.read().count("GUEST UP")
    except FileNotFoundError:
        return 0


def wait_for_ticks(console, above, timeout=BOOT_TIMEOUT_S, diagnose=None):
    """The guest's last tick once above ``above``; on timeout the failure
    shows the console's end and what ``diagnose()`` says of the guest."""
    deadline = time.monotonic() + timeout
    while ticks(console) <= above:
        if time.monotonic() > deadline:
            try:
                with open(console, errors="replace") as f:
                    tail = f.read()[-600:]
            except FileNotFoundError:
                tail = "(no console file)"
            pytest.fail(f"guest console {console} shows no tick above {above} after "
                        f"{timeout} s; {diagnose() if diagnose else ''}\n"
                        f"it ends with:\n{tail}")
        time.sleep(0.2)
    return ticks(console)


def boot_instance(db, driver, lab, instances, name, host="lab-a"):
    """Record an instance on ``host`` and boot its guest (until it ticks)."""
    inst = cloud.add_instance(db, driver, name, host, memory_mb=256, vcpus=1, disk_gb=1,
                              flavor_name="lab.tiny")
    wait_for_ticks(lab.console(instances.replace("{host}", host), inst["uuid"]), 1)
    return inst


def assert_runs_on_lab_b(lab, db, uuid, still_ticking=False):
    """The guest runs (persistent) on lab-b only, as both daemons and the
    database say; ``still_ticking``: and its console goes on."""
    assert where(lab, uuid) == {"lab-b": ("running", True)}
    moved = db.get_instance(uuid)
    assert (moved["host"], moved["power_state"], moved["task_state"]) == \
        ("lab-b", "running", None)
    if still_ticking:
        console = lab.console(lab.shared_instances, uuid)
        wait_for_ticks(console, ticks(console), TICK_TIMEOUT_S,
                       diagnose=lambda: guest_report(lab, "lab-b", uuid))
        assert boots(console) == 1, "the guest booted again: it crashed on lab-b"


def guest_report(lab, host, instance_uuid):
    """What ``host``'s daemon and QEMU say of a guest (for a failure
    message: a guest that stopped printing, running or stuck?)."""
    import libvirt
    import libvirt_qemu
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByUUIDString(instance_uuid)
        state, reason = dom.state()
        status = libvirt_qemu.qemuMonitorCommand(dom, "info status", 1).strip()
        return (f"on {host}: state {state} reason {reason}, QEMU {status!r}, vCPU used "
                f"{vcpu_seconds(lab, host, instance_uuid, 2.0):.2f} s in 2 s")
    except libvirt.libvirtError as err:
        return f"on {host}: {err}"
    finally:
        conn.close()


def where(lab, instance_uuid):
    """{host: (state, persistent)} of the guest in both daemons, read
    through connections of this test (not the driver's)."""
    import libvirt
    seen = {}
    for host in LAB_HOSTS:
        conn = libvirt.open(lab.uri(host))
        try:
            dom = conn.lookupByUUIDString(instance_uuid)
            seen[host] = ({libvirt.VIR_DOMAIN_RUNNING: "running",
                           libvirt.VIR_DOMAIN_PAUSED: "paused",
                           libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}.get(dom.state()[0]),
                          bool(dom.isPersistent()))
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        finally:
            conn.close()
    return seen


def vcpu_seconds(lab, host, instance_uuid, over):
    """CPU seconds the guest's vCPU used during ``over`` seconds."""
    import libvirt
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByUUIDString(instance_uuid)
        before = dom.info()[4]
        time.sleep(over)
        return (dom.info()[4] - before) / 1e9
    finally:
        conn.close()


@pytest.fixture
def lab_cloud(lab_conf, libvirt_lab):
    db = db_api.get_db(lab_conf)
    driver = drivers.get_driver(lab_conf)
    return db, driver, api.MigrationAPI(lab_conf)


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
    console = lab.console(lab.instances("lab-b"), uuid)
    wait_for_ticks(console, before, TICK_TIMEOUT_S)
    assert boots(console) == 0, "the guest booted again: it crashed on lab-b"
    assert not os.path.exists(os.path.join(lab.instances("lab-a"), uuid))


@pytest.fixture
def slow_shared_copy(lab_cloud, libvirt_lab, lab_conf):
    """Both hosts on one (shared) instances directory, copies capped at
    10 MiB/s: a guest dirtying 64 MiB without pause never converges."""
    overrides = [
        ("instances_path", libvirt_lab.shared_instances, "libvirt"),
        # a local directory both daemons see: libvirt cannot tell it is shared
        ("live_migration_flag", ["VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER",
                                 "VIR_MIGRATE_PERSIST_DEST", "VIR_MIGRATE_UNDEFINE_SOURCE",
                                 "VIR_MIGRATE_UNSAFE"], "libvirt"),
        ("live_migration_bandwidth", 10, "migration"),
    ]
    for name, value, group in overrides:
        lab_conf.set_override(name, value, group)
    db, _driver, client = lab_cloud
    driver = drivers.get_driver(lab_conf)
    add_lab_hosts(db, driver, shared_storage="lab-shared")
    yield db, driver, client
    for name, _value, group in overrides:
        lab_conf.clear_override(name, group)


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
    console = lab.console(lab.shared_instances, uuid)
    wait_for_ticks(console, ticks(console), TICK_TIMEOUT_S,
                   diagnose=lambda: guest_report(lab, "lab-a", uuid))
    assert boots(console) == 1, "the guest booted again after the abort"


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
        console = lab.console(lab.shared_instances, uuid)
        wait_for_ticks(console, ticks(console), TICK_TIMEOUT_S)
    finally:
        lab_conf.clear_override("live_migration_permit_post_copy", "migration")


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

def escalate_at_once(lab_conf):
    """Escalation on, post-copy permitted, one stuck pass enough (TCG passes
    are slow); returns the overrides, for the test to clear."""
    overrides = [("live_migration_permit_post_copy", True),
                 ("live_migration_escalation", True),
                 ("live_migration_escalation_iterations", 1)]
    for name, value in overrides:
        lab_conf.set_override(name, value, "migration")
    return overrides


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
    console = lab.console(lab.instances("lab-a"), uuid)
    wait_for_ticks(console, ticks(console), TICK_TIMEOUT_S)


# -- the controller killed while the copy runs ---------------------------------------------

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
    console = lab.console(lab.shared_instances, uuid)
    wait_for_ticks(console, ticks(console), TICK_TIMEOUT_S,
                   diagnose=lambda: guest_report(lab, "lab-a", uuid))
    assert boots(console) == 1, "the guest booted again after the abort"


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
