"""The live-migration flow end to end: real TaskFlow engine, SQLite state
and flow persistence, fake hypervisors.  Every test asserts the end state
in the database and in the fake driver."""
import pytest

from helpers import CaptureFactory, fail_after_execute, snapshot, wait_until
from migrateflow import api, cloud
from migrateflow.flows import live_migration
from migrateflow.tasks import live_checks, live_prepare

PRE_POINT_OF_NO_RETURN = [
    "start-live-migration", "check-instance-and-source", "check-candidate-host",
    "claim-destination-resources", "check-can-live-migrate-destination",
    "check-can-live-migrate-source", "bind-destination-ports",
    "connect-destination-volumes", "pre-live-migration", "live-migration",
]
POST_STEPS = [
    "record-instance-on-destination", "activate-destination-ports",
    "post-live-migration-at-source", "terminate-source-volume-connections",
    "post-live-migration-at-destination", "cleanup-source", "complete-live-migration",
]


def _api(capture=None):
    return api.MigrationAPI(listeners=[capture] if capture else [])


def _assert_on_host(db, driver, inst_uuid, host, others):
    inst = db.get_instance(inst_uuid)
    assert (inst["host"], inst["vm_state"], inst["task_state"], inst["power_state"]) == (
        host, "active", None, "running")
    assert [(g["uuid"], g["state"]) for g in driver.guests(host)] == [(inst_uuid, "running")]
    ports = {p["id"] for p in db.list_ports(inst_uuid)}
    assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(inst_uuid)} \
        == {(p, host, "ACTIVE") for p in ports}
    assert {v["port_id"] for v in driver.vifs(host)} == ports
    volumes = {b["volume_id"] for b in db.list_block_devices(inst_uuid)}
    assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(inst_uuid)} \
        == {(v, host) for v in volumes}
    assert {v["volume_id"] for v in driver.volume_connections(host)} == volumes
    for other in others:
        assert driver.guests(other) == []
        assert driver.vifs(other) == []
        assert driver.volume_connections(other) == []
    assert db.list_claims() == []
    for h in [host, *others]:
        assert not [f for f in driver.files(h) if "probe-" in f["path"]], "probe file left"


def test_flow_declares_exact_requirements():
    flow = live_migration.build()
    assert set(flow.requires) == set(live_migration.REQUIRES)
    names = [atom.name for atom, _ in flow.iter_nodes()]
    assert len(names) == len(set(names))


def test_live_migration_on_shared_storage(small_cloud, db, driver):
    inst = small_cloud["instance"]
    mig = _api().live_migrate(inst["uuid"], "host-b")
    assert (mig["status"], mig["dest_host"], mig["block_migration"]) == (
        "completed", "host-b", False)
    assert mig["memory_processed_mb"] >= inst["memory_mb"] and mig["downtime_ms"] > 0
    _assert_on_host(db, driver, inst["uuid"], "host-b", ["host-a", "host-c"])
    usage = {h["name"]: h["memory_used_mb"] for h in db.list_hosts()}
    assert usage == {"host-a": 0, "host-b": inst["memory_mb"], "host-c": 0}
    # shared storage: the instance directory stays, seen by both hosts
    assert any(inst["uuid"] in f["path"] for f in driver.files("host-b"))


def test_block_migration_to_local_storage(small_cloud, db, driver):
    inst = small_cloud["instance"]
    mig = _api().live_migrate(inst["uuid"], "host-c")
    assert (mig["status"], mig["block_migration"]) == ("completed", True)
    _assert_on_host(db, driver, inst["uuid"], "host-c", ["host-a", "host-b"])
    assert any(inst["uuid"] in f["path"] for f in driver.files("host-c"))
    assert not any(inst["uuid"] in f["path"] for f in driver.files("host-a"))
    usage = {h["name"]: (h["memory_used_mb"], h["disk_used_gb"]) for h in db.list_hosts()}
    assert usage["host-a"] == (0, 0) and usage["host-c"] == (2048, 20)


def test_scheduler_picks_a_destination(small_cloud, db, driver):
    inst = small_cloud["instance"]
    mig = _api().live_migrate(inst["uuid"])
    assert mig["status"] == "completed" and mig["dest_host"] in ("host-b", "host-c")
    _assert_on_host(db, driver, inst["uuid"], mig["dest_host"],
                    {"host-b", "host-c"} - {mig["dest_host"]} | {"host-a"})


def _inject(step, monkeypatch, driver, inst_uuid):
    """Make ``step`` fail: through the fake driver where the step calls the
    hypervisor, else after the step's own database work."""
    driver_faults = {
        "check-instance-and-source": ("get_guest", "before"),
        "check-can-live-migrate-destination": ("check_can_live_migrate_destination", "before"),
        "check-can-live-migrate-source": ("check_can_live_migrate_source", "before"),
        "pre-live-migration": ("pre_live_migration", "after"),
        "live-migration": ("live_migration", "after"),
    }
    db_steps = {
        "start-live-migration": live_checks.StartLiveMigration,
        "check-candidate-host": live_checks.CheckCandidateHost,
        "claim-destination-resources": live_checks.ClaimDestinationResources,
        "bind-destination-ports": live_prepare.BindDestinationPorts,
        "connect-destination-volumes": live_prepare.ConnectDestinationVolumes,
    }
    if step in driver_faults:
        method, when = driver_faults[step]
        driver.inject_fault(method, instance=inst_uuid, when=when,
                            message=f"injected fault in {step}")
    else:
        fail_after_execute(monkeypatch, db_steps[step])


@pytest.mark.parametrize("step", PRE_POINT_OF_NO_RETURN)
@pytest.mark.parametrize("dest", ["host-b", "host-c"])
def test_failure_at_each_step_rolls_back(step, dest, small_cloud, db, driver, monkeypatch):
    inst = small_cloud["instance"]
    before = snapshot(db, driver, inst["uuid"])
    _inject(step, monkeypatch, driver, inst["uuid"])
    capture = CaptureFactory()
    mig = _api(capture).live_migrate(inst["uuid"], dest)

    assert mig["status"] == "failed"
    assert step in mig["error"] and "injected" in mig["error"]
    cap = capture.last
    executed, reverted = cap.executed(), cap.reverted()
    assert cap.failed() == [step]
    # the failed step is reverted first, then every finished one in reverse
    assert reverted == [step] + list(reversed(executed))
    assert snapshot(db, driver, inst["uuid"]) == before
    _assert_on_host(db, driver, inst["uuid"], "host-a", {"host-b", "host-c"} - {"host-a"})


def test_retry_on_next_candidate(small_cloud, db, driver):
    inst = small_cloud["instance"]
    candidates, _refused = _api()._candidates(db.get_instance(inst["uuid"]),
                                              db.get_host("host-a"), None, None)
    first = candidates[0]
    driver.inject_fault("check_can_live_migrate_destination", host=first,
                        message="probe failed")
    mig = _api().live_migrate(inst["uuid"])
    second = ({"host-b", "host-c"} - {first}).pop()
    assert (mig["status"], mig["dest_host"]) == ("completed", second)
    assert "probe failed" in mig["scheduler_notes"][first]
    _assert_on_host(db, driver, inst["uuid"], second, ["host-a", first])


def test_all_candidates_fail(small_cloud, db, driver):
    inst = small_cloud["instance"]
    before = snapshot(db, driver, inst["uuid"])
    driver.inject_fault("check_can_live_migrate_destination", count=-1,
                        message="destination refuses")
    mig = _api().live_migrate(inst["uuid"])
    assert mig["status"] == "failed"
    assert "NoValidHost" in mig["error"] or "no valid host" in mig["error"]
    for host in ("host-b", "host-c"):
        assert "destination refuses" in mig["error"] and host in mig["error"]
    assert snapshot(db, driver, inst["uuid"]) == before


@pytest.mark.parametrize("method, step", [
    ("post_live_migration_at_source", "post-live-migration-at-source"),
    ("post_live_migration_at_destination", "post-live-migration-at-destination"),
    ("cleanup", "cleanup-source"),
])
def test_post_step_failure_never_moves_the_guest_back(method, step, small_cloud, db, driver):
    inst = small_cloud["instance"]
    driver.inject_fault(method, instance=inst["uuid"], count=-1, message="post failed")
    mig = _api().live_migrate(inst["uuid"], "host-c")
    assert (mig["status"], mig["failed_step"]) == ("error", step)
    assert "post failed" in mig["error"]
    got = db.get_instance(inst["uuid"])
    assert (got["host"], got["task_state"], got["vm_state"]) == ("host-c", None, "active")
    assert [(g["uuid"], g["state"]) for g in driver.guests("host-c")] == [
        (inst["uuid"], "running")]
    assert all(g["state"] != "running" for g in driver.guests("host-a"))
    assert db.list_claims() == []


def test_post_step_transient_failure_is_retried(small_cloud, db, driver):
    inst = small_cloud["instance"]
    driver.inject_fault("post_live_migration_at_source", instance=inst["uuid"], count=2)
    mig = _api().live_migrate(inst["uuid"], "host-b")
    assert (mig["status"], mig["failed_step"]) == ("completed", None)
    _assert_on_host(db, driver, inst["uuid"], "host-b", ["host-a", "host-c"])


def test_migration_that_never_converges_times_out(small_cloud, db, driver, conf):
    inst = small_cloud["instance"]
    before = snapshot(db, driver, inst["uuid"])
    driver.set_dirty_rate(inst["uuid"], 4096.0)
    conf.set_override("live_migration_completion_timeout", 5, group="migration")
    mig = _api().live_migrate(inst["uuid"], "host-b")
    assert mig["status"] == "failed" and "did not complete" in mig["error"]
    assert snapshot(db, driver, inst["uuid"]) == before


def test_timeout_action_force_complete_with_post_copy(small_cloud, db, driver, conf):
    inst = small_cloud["instance"]
    driver.set_dirty_rate(inst["uuid"], 4096.0)
    conf.set_override("live_migration_completion_timeout", 5, group="migration")
    conf.set_override("live_migration_timeout_action", "force_complete", group="migration")
    conf.set_override("live_migration_permit_post_copy", True, group="migration")
    mig = _api().live_migrate(inst["uuid"], "host-b")
    assert (mig["status"], mig["post_copy"]) == ("completed", True)
    _assert_on_host(db, driver, inst["uuid"], "host-b", ["host-a", "host-c"])


def test_auto_converge_lets_a_busy_guest_finish(small_cloud, db, driver, conf):
    inst = small_cloud["instance"]
    driver.set_dirty_rate(inst["uuid"], 2048.0)
    conf.set_override("live_migration_permit_auto_converge", True, group="migration")
    mig = _api().live_migrate(inst["uuid"], "host-b")
    assert mig["status"] == "completed"
    _assert_on_host(db, driver, inst["uuid"], "host-b", ["host-a", "host-c"])


def test_operator_abort_cancels_and_rolls_back(small_cloud, db, driver):
    inst = small_cloud["instance"]
    before = snapshot(db, driver, inst["uuid"])
    driver.inject_fault("get_migration_job", action="hang", instance=inst["uuid"], count=-1)
    client = _api()
    mig = client.live_migrate(inst["uuid"], "host-b", wait=False)
    wait_until(lambda: db.get_migration(mig["uuid"])["status"] == "running")
    client.abort(mig["uuid"])
    wait_until(lambda: db.get_migration(mig["uuid"])["status"] not in ("running",))
    mig = db.get_migration(mig["uuid"])
    assert mig["status"] == "cancelled" and "aborted" in mig["error"]
    driver.clear_faults()
    assert snapshot(db, driver, inst["uuid"]) == before


def test_second_migration_after_first(small_cloud, db, driver):
    inst = small_cloud["instance"]
    assert _api().live_migrate(inst["uuid"], "host-c")["status"] == "completed"
    assert _api().live_migrate(inst["uuid"], "host-b")["status"] == "completed"
    _assert_on_host(db, driver, inst["uuid"], "host-b", ["host-a", "host-c"])
    assert len(db.list_migrations(instance_uuid=inst["uuid"])) == 2


def test_volume_backed_instance_without_shared_storage(db, driver):
    cloud.add_host(db, driver, "host-a")
    cloud.add_host(db, driver, "host-b")
    inst = cloud.add_instance(db, driver, "vm-v", "host-a", volumes=2, volume_backed=True)
    mig = _api().live_migrate(inst["uuid"], "host-b", block_migration=False)
    assert (mig["status"], mig["block_migration"]) == ("completed", False)
    _assert_on_host(db, driver, inst["uuid"], "host-b", ["host-a"])


def test_refused_hosts_are_explained_on_the_record(small_cloud, db, driver):
    cloud.add_host(db, driver, "host-xen", hypervisor_type="Xen")
    inst = small_cloud["instance"]
    mig = _api().live_migrate(inst["uuid"])
    assert mig["status"] == "completed"
    assert "hypervisor type mismatch" in mig["scheduler_notes"]["host-xen"]


def test_background_run_can_be_waited_for_and_shows_its_steps(small_cloud, db, driver):
    inst = small_cloud["instance"]
    client = _api()
    mig = client.live_migrate(inst["uuid"], "host-b", wait=False)
    assert mig["status"] == "queued"
    mig = client.wait(mig["uuid"], timeout=60)
    assert mig["status"] == "completed"
    assert db.get_instance(inst["uuid"])["task_state"] is None
    steps = client.flow_steps(mig["uuid"])
    assert [s["name"] for s in steps][:2] == ["start-live-migration",
                                              "check-instance-and-source"]
    assert {s["state"] for s in steps} == {"SUCCESS"}


def test_a_rollback_that_breaks_still_ends_the_migration(small_cloud, db, driver,
                                                         monkeypatch):
    """A revert raising an unexpected error stops TaskFlow's rollback; the
    migration must not stay transitional.  (The raising revert is a
    monkeypatch: it stands for a bug, which cannot be injected otherwise.)"""
    inst = small_cloud["instance"]
    driver.inject_fault("pre_live_migration", instance=inst["uuid"])

    def broken_revert(self, *args, **kwargs):
        raise RuntimeError("bug in a revert")

    monkeypatch.setattr(live_prepare.ConnectDestinationVolumes, "revert", broken_revert)
    mig = _api().live_migrate(inst["uuid"], "host-b")
    assert mig["status"] == "error" and "bug in a revert" in mig["error"]
    got = db.get_instance(inst["uuid"])
    # the hypervisors say the guest runs on the source only: not flagged ERROR
    assert (got["host"], got["task_state"], got["vm_state"]) == ("host-a", None, "active")


def test_concurrent_migrations_share_one_sqlite_file(db, driver):
    """Ten flows at once on one SQLite file: writers queue (BEGIN IMMEDIATE
    and a busy timeout), none fails with "database is locked"."""
    cloud.add_host(db, driver, "host-a", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-b", shared_storage="nfs-1")
    uuids = [cloud.add_instance(db, driver, f"vm-{i}", "host-a", volumes=1)["uuid"]
             for i in range(10)]
    client = _api()
    migrations = [client.live_migrate(u, "host-b", wait=False) for u in uuids]
    ended = [client.wait(m["uuid"], timeout=120) for m in migrations]
    assert [(m["status"], m["error"]) for m in ended] == [("completed", None)] * 10
    assert {i["host"] for i in db.list_instances()} == {"host-b"}
    assert db.get_host("host-a")["memory_used_mb"] == 0
    assert db.list_claims() == []
