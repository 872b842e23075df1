"""Every live-migration task on its own, against the SQLite state database
and the fake hypervisors: execute, revert, and idempotency (executing twice
or reverting twice leaves exactly the state of doing it once).

Each test accepts a real migration of vm-1 (on host-a) through the API and
runs the real steps the flow runs before the task under test, feeding them
the store values the flow would; then it calls the task directly.
host-b shares storage with host-a (live migration), host-c does not (block
migration).
"""
import pytest
from taskflow.types.failure import Failure

import task_checks
from helpers import snapshot
from migrateflow import api
from migrateflow import exceptions as exc
from migrateflow.db import api as db_api
from migrateflow.flows import live_migration
from migrateflow.tasks import live_checks, live_migrate, live_post, live_prepare

SOURCE, SHARED, LOCAL = "host-a", "host-b", "host-c"
DESTS = pytest.mark.parametrize("dest", [SHARED, LOCAL])


def flow_tasks():
    """Fresh instances of the flow's tasks, in the order the flow runs them."""
    return list(task_checks.tasks_of(live_migration.build()))


STEPS = [task.name for task in flow_tasks()]
#: store key each step's result is saved under in the flow
PROVIDES = {task.name: [str(key) for key in task.provides] for task in flow_tasks()}
POST_STEPS = STEPS[STEPS.index("record-instance-on-destination"):]
#: steps whose revert undoes what their execute did
UNDOING_STEPS = ["claim-destination-resources", "check-can-live-migrate-destination",
                 "bind-destination-ports", "connect-destination-volumes",
                 "pre-live-migration"]


def failure(error):
    return Failure.from_exception(error)


class Migration:
    """A live migration of one instance accepted through the API, and the
    flow store as the real steps run so far have filled it."""

    def __init__(self, db, driver, instance_id, dest, block_migration=None):
        self.db, self.driver, self.instance_id = db, driver, instance_id
        mig, store = api.MigrationAPI()._accept_live_migration(
            instance_id, dest, block_migration)
        self.id = mig["uuid"]
        self.store = {str(key): value for key, value in store.items()}
        # the first value the flow's retry controller provides
        self.store["candidate"] = self.store["candidates"][0]
        self.results = {}
        self.done = 0  # how many of the flow's steps ran

    def args(self, task):
        return {name: self.store[name] for name in task.requires}

    def execute(self, task):
        """task.execute with the store values; its result is stored as the
        flow stores it."""
        result = task.execute(**self.args(task))
        self.results[task.name] = result
        if self.done < len(STEPS) and task.name == STEPS[self.done]:
            self.done += 1
        for key in PROVIDES[task.name]:
            self.store[key] = result
        return result

    def revert(self, task, result=None, flow_failures=None):
        return task.revert(result=result, flow_failures=flow_failures or {},
                           **self.args(task))

    def run_until(self, step):
        """Execute the flow's steps not run yet that come before ``step``."""
        for task in flow_tasks()[self.done:STEPS.index(step)]:
            self.execute(task)

    def migration(self):
        mig = self.db.get_migration(self.id)
        mig.pop("updated_at")
        return mig

    def instance(self):
        return self.db.get_instance(self.instance_id)

    def state(self, side_effects=True):
        """Database and hypervisors; with the fake's side-effect counters and
        timeline unless ``side_effects`` is False."""
        state = {"snapshot": snapshot(self.db, self.driver, self.instance_id),
                 "migration": self.migration()}
        if side_effects:
            state["side_effects"] = self.driver.counters()
            state["timeline"] = [(e["event"], e["host"]) for e in self.driver.timeline()]
        return state


@pytest.fixture
def migration(small_cloud, db, driver):
    """Factory: accept a live migration of vm-1 to ``dest`` and run the
    flow's steps before ``upto``."""
    def make(dest=SHARED, upto=None, block_migration=None):
        mig = Migration(db, driver, small_cloud["instance"]["uuid"], dest, block_migration)
        if upto is not None:
            mig.run_until(upto)
        return mig
    return make


@pytest.fixture
def uuid(small_cloud):
    return small_cloud["instance"]["uuid"]


def fresh(step):
    """A new instance of the task class of ``step`` (not the flow's)."""
    task_cls = {task.name: type(task) for task in flow_tasks()}[step]
    return task_cls()


def instance_files(driver, host, uuid):
    return [f["path"] for f in driver.files(host) if uuid in f["path"]]


def instance_dir(uuid):
    return f"/var/lib/migrateflow/instances/{uuid}"


def probe_file(uuid):
    return f"/var/lib/migrateflow/instances/probe-{uuid}"


def start_copy_then_fail(driver, uuid):
    """The copy job starts, then the hypervisor's answer is lost: the task
    fails with the job running (the incoming guest paused on the
    destination)."""
    driver.inject_fault("live_migration", instance=uuid, when="after", message="reply lost")


# -- every step: idempotency ---------------------------------------------------

@DESTS
@pytest.mark.parametrize("step", STEPS)
def test_execute_twice_leaves_the_state_of_once(step, dest, migration):
    task_checks.execute_twice_is_once(migration(dest, upto=step), fresh(step))


@DESTS
@pytest.mark.parametrize("step", [s for s in STEPS if s != "live-migration"])
def test_revert_twice_leaves_the_state_of_once(step, dest, migration):
    task_checks.revert_twice_is_once(migration(dest, upto=step), fresh(step))


@DESTS
@pytest.mark.parametrize("step", UNDOING_STEPS)
def test_revert_restores_the_state_before_execute(step, dest, migration):
    task_checks.revert_undoes_execute(migration(dest, upto=step), fresh(step))


# -- start-live-migration --------------------------------------------------------

def test_start_moves_the_queued_migration_to_preparing(migration):
    mig = migration(upto="start-live-migration")
    before = mig.state()
    assert mig.migration()["status"] == "queued"
    mig.execute(live_checks.StartLiveMigration())
    assert mig.migration()["status"] == "preparing"
    assert mig.state()["snapshot"] == before["snapshot"]
    assert mig.instance()["task_state"] == "migrating"


def test_start_revert_marks_the_migration_failed_and_releases_the_instance(migration):
    mig = migration(upto="check-instance-and-source")
    before = mig.state()["snapshot"]
    fails = {"pre-live-migration": failure(exc.DriverError("bridge missing"))}
    mig.revert(live_checks.StartLiveMigration(), flow_failures=fails)
    got = mig.migration()
    assert (got["status"], got["error"], got["current_step"]) == (
        "failed", "pre-live-migration: bridge missing", None)
    assert got["finished_at"] is not None
    inst = mig.instance()
    assert (inst["host"], inst["task_state"], inst["vm_state"], inst["power_state"]) == (
        SOURCE, None, "active", "running")
    # nothing else moved: the instance is released where it was
    before["instance"]["task_state"] = None
    assert mig.state()["snapshot"] == before


def test_start_revert_after_an_operator_abort_marks_the_migration_cancelled(migration):
    mig = migration(upto="live-migration")
    fails = {"live-migration": failure(exc.MigrationAborted("aborted by operator"))}
    mig.revert(live_checks.StartLiveMigration(), flow_failures=fails)
    got = mig.migration()
    assert (got["status"], got["error"]) == ("cancelled", "live-migration: aborted by operator")
    assert mig.instance()["task_state"] is None


def test_start_revert_twice_keeps_the_first_reason(migration):
    mig = migration(upto="check-instance-and-source")
    task = live_checks.StartLiveMigration()
    mig.revert(task, flow_failures={"x": failure(exc.DriverError("first"))})
    once = mig.state()
    mig.revert(task, flow_failures={"y": failure(exc.DriverError("second"))})
    assert mig.state() == once and once["migration"]["error"] == "x: first"


# -- check-instance-and-source (read-only) --------------------------------------

def test_check_instance_and_source_passes_and_changes_nothing(migration):
    mig = migration(upto="check-instance-and-source")
    before = mig.state()
    assert mig.execute(live_checks.CheckInstanceAndSource()) is None
    assert mig.state() == before


def _stop_instance(db, driver, uuid):
    db.update_instance(uuid, vm_state="stopped", power_state="shutdown")


def _pause_instance(db, driver, uuid):
    db.update_instance(uuid, power_state="paused")


def _record_instance_elsewhere(db, driver, uuid):
    db.update_instance(uuid, host=LOCAL)


def _take_source_down(db, driver, uuid):
    db.update_host(SOURCE, up=False)


def _lose_guest_on_source(db, driver, uuid):
    driver.destroy(SOURCE, db_api.instance_to_driver(db.get_instance(uuid)),
                   destroy_disks=False)


@pytest.mark.parametrize("breakage, error, words", [
    (_stop_instance, exc.InstanceInvalidState, "must be active and running"),
    (_pause_instance, exc.InstanceInvalidState, "active/paused"),
    (_record_instance_elsewhere, exc.InstanceInvalidState, f"is on {LOCAL}, not {SOURCE}"),
    (_take_source_down, exc.HostUnavailable, f"source host {SOURCE} is down"),
    (_lose_guest_on_source, exc.InstanceInvalidState, "as absent"),
], ids=["stopped", "paused", "elsewhere", "source-down", "no-guest"])
def test_check_instance_and_source_refuses(breakage, error, words, migration, db, driver, uuid):
    mig = migration(upto="check-instance-and-source")
    breakage(db, driver, uuid)
    before = mig.state()
    with pytest.raises(error, match=words):
        mig.execute(live_checks.CheckInstanceAndSource())
    assert mig.state() == before


# -- check-candidate-host ------------------------------------------------------------

def test_check_candidate_host_records_it_as_destination(migration):
    mig = migration(upto="check-candidate-host")
    before = mig.state()
    assert mig.execute(live_checks.CheckCandidateHost()) == SHARED
    assert mig.store["dest_host"] == SHARED
    after = mig.state()
    assert after["migration"]["dest_host"] == SHARED
    after["migration"]["dest_host"] = None
    assert after == before


def test_check_candidate_none_reports_no_valid_host_with_scheduler_notes(migration, db, uuid):
    mig = migration(upto="check-candidate-host")
    db.add_scheduler_note(mig.id, SHARED, "check-can-live-migrate-destination: probe failed")
    db.add_scheduler_note(mig.id, LOCAL, "check-candidate-host: not enough memory")
    mig.store["candidate"] = None
    before = mig.state()
    with pytest.raises(exc.NoValidHost) as err:
        mig.execute(live_checks.CheckCandidateHost())
    assert err.value.message == (
        f"no valid host for instance {uuid}: "
        f"{SHARED}: check-can-live-migrate-destination: probe failed; "
        f"{LOCAL}: check-candidate-host: not enough memory")
    assert mig.state() == before


def test_check_candidate_none_without_notes_says_no_candidates(migration, uuid):
    mig = migration(upto="check-candidate-host")
    mig.store["candidate"] = None
    with pytest.raises(exc.NoValidHost, match=f"instance {uuid}: no candidates$"):
        mig.execute(live_checks.CheckCandidateHost())


@pytest.mark.parametrize("host_values, error, words", [
    ({"up": False}, exc.HostUnavailable, f"destination host {SHARED} is down"),
    ({"forced_down": True}, exc.HostUnavailable, "is down"),
    ({"disabled": True, "disabled_reason": "maintenance"}, exc.HostUnavailable,
     "is disabled: maintenance"),
    ({"memory_used_mb": 64000}, exc.InsufficientResources,
     f"not enough memory on {SHARED}: instance needs 2048 MB, 1536 MB free"),
    ({"hypervisor_type": "Xen"}, exc.HypervisorMismatch, "type mismatch"),
    ({"hypervisor_version": 6000000}, exc.HypervisorMismatch, "older than source"),
], ids=["down", "forced-down", "disabled", "too-little-memory", "hv-type", "hv-version"])
def test_check_candidate_host_refuses(host_values, error, words, migration, db):
    mig = migration(upto="check-candidate-host")
    db.update_host(SHARED, **host_values)
    before = mig.state()
    with pytest.raises(error, match=words):
        mig.execute(live_checks.CheckCandidateHost())
    assert mig.state() == before


@pytest.mark.parametrize("candidate, error", [
    ("host_b!", exc.InvalidHostName), (SOURCE, exc.InvalidRequest),
    ("host-z", exc.HostNotFound),
])
def test_check_candidate_host_refuses_bad_candidates(candidate, error, migration):
    mig = migration(upto="check-candidate-host")
    mig.store["candidate"] = candidate
    before = mig.state()
    with pytest.raises(error):
        mig.execute(live_checks.CheckCandidateHost())
    assert mig.state() == before


def test_check_candidate_revert_records_why_the_candidate_was_refused(migration):
    mig = migration(upto="check-candidate-host")
    task = live_checks.CheckCandidateHost()
    mig.execute(task)
    fails = {"check-can-live-migrate-destination": failure(exc.InjectedFault("probe failed"))}
    mig.revert(task, SHARED, flow_failures=fails)
    assert mig.migration()["scheduler_notes"] == {
        SHARED: "check-can-live-migrate-destination: probe failed"}
    once = mig.state()
    mig.revert(task, SHARED, flow_failures=fails)
    assert mig.state() == once


def test_check_candidate_revert_of_its_own_failure_records_that_reason(migration, db):
    mig = migration(upto="check-candidate-host")
    db.update_host(SHARED, up=False)
    task = live_checks.CheckCandidateHost()
    with pytest.raises(exc.HostUnavailable) as err:
        mig.execute(task)
    fail = failure(err.value)
    mig.revert(task, fail, flow_failures={task.name: fail})
    assert mig.migration()["scheduler_notes"] == {
        SHARED: f"check-candidate-host: destination host {SHARED} is down"}


def test_check_candidate_none_revert_changes_nothing(migration):
    mig = migration(upto="check-candidate-host")
    mig.store["candidate"] = None
    before = mig.state()
    fail = failure(exc.NoValidHost("no valid host"))
    mig.revert(live_checks.CheckCandidateHost(), fail,
               flow_failures={"check-candidate-host": fail})
    assert mig.state() == before


# -- claim-destination-resources -----------------------------------------------

@DESTS
def test_claim_holds_the_instance_resources_on_the_destination(dest, migration):
    mig = migration(dest, upto="claim-destination-resources")
    mig.execute(live_checks.ClaimDestinationResources())
    claims = mig.db.list_claims()
    assert [(c["migration_uuid"], c["host"], c["memory_mb"], c["vcpus"], c["disk_gb"])
            for c in claims] == [(mig.id, dest, 2048, 2, 20)]
    usage = mig.state()["snapshot"]["usage"]
    assert usage == {SOURCE: (2048, 2, 20), dest: (2048, 2, 20),
                     ({SHARED, LOCAL} - {dest}).pop(): (0, 0, 0)}


def test_claim_refused_when_the_destination_filled_up(migration, db):
    mig = migration(upto="claim-destination-resources")
    db.update_host(SHARED, memory_used_mb=64000)
    before = mig.state()
    with pytest.raises(exc.InsufficientResources, match=f"host {SHARED} cannot hold"):
        mig.execute(live_checks.ClaimDestinationResources())
    assert mig.state() == before


def test_claim_revert_of_a_refused_claim_changes_nothing(migration, db):
    mig = migration(upto="claim-destination-resources")
    db.update_host(SHARED, memory_used_mb=64000)
    task = live_checks.ClaimDestinationResources()
    with pytest.raises(exc.InsufficientResources) as err:
        mig.execute(task)
    before = mig.state()
    mig.revert(task, failure(err.value))
    assert mig.state() == before


def test_claim_revert_after_a_failure_drops_a_claim_already_made(migration, db):
    """The step may die after its claim was committed: revert drops it
    even when the result is a failure."""
    mig = migration(upto="claim-destination-resources")
    before = mig.state(side_effects=False)
    task = live_checks.ClaimDestinationResources()
    mig.execute(task)
    mig.revert(task, failure(exc.DriverError("lost the database connection")))
    assert db.list_claims() == []
    assert mig.state(side_effects=False) == before


# -- check-can-live-migrate-destination --------------------------------------------

@pytest.mark.parametrize("dest, disk_free", [
    (SHARED, 980),   # the storage it shares with the source holds vm-1's 20 GB
    (LOCAL, 1000),
])
def test_check_destination_leaves_a_probe_file_in_the_destination_storage(
        dest, disk_free, migration, driver, uuid):
    mig = migration(dest, upto="check-can-live-migrate-destination")
    probe = probe_file(uuid)
    data = mig.execute(live_checks.CheckDestination())
    assert data == {"dest": dest, "probe_file": probe, "disk_available_gb": disk_free,
                    "block_migration": None}
    assert mig.store["dest_check_data"] == data
    assert probe in instance_files(driver, dest, uuid)
    # shared storage: the source sees the probe too; local: it does not
    assert (probe in instance_files(driver, SOURCE, uuid)) is (dest == SHARED)
    assert driver.side_effects(uuid)[("check_can_live_migrate_destination", dest)] == 1


@DESTS
def test_check_destination_revert_removes_the_probe(dest, migration, driver, uuid):
    mig = migration(dest, upto="check-can-live-migrate-destination")
    task = live_checks.CheckDestination()
    data = mig.execute(task)
    mig.revert(task, data)
    assert probe_file(uuid) not in instance_files(driver, dest, uuid)
    assert driver.side_effects(uuid)[("cleanup_live_migration_destination_check", dest)] == 1


def test_check_destination_revert_of_a_refused_check_changes_nothing(migration, driver):
    mig = migration(LOCAL, upto="check-can-live-migrate-destination")
    driver.add_host(LOCAL, cpu_features=["avx"])
    task = live_checks.CheckDestination()
    before = mig.state()
    with pytest.raises(exc.CPUIncompatible, match="lacks CPU features") as err:
        mig.execute(task)
    mig.revert(task, failure(err.value))
    assert mig.state() == before


def test_check_destination_refuses_a_block_migration_without_disk(migration, driver):
    mig = migration(LOCAL, upto="check-can-live-migrate-destination", block_migration=True)
    driver.add_host(LOCAL, disk_gb=10)
    before = mig.state()
    with pytest.raises(exc.InsufficientResources, match="needs 20 GB"):
        mig.execute(live_checks.CheckDestination())
    assert mig.state() == before


def test_check_destination_revert_survives_a_failing_cleanup(migration, driver, uuid):
    mig = migration(upto="check-can-live-migrate-destination")
    task = live_checks.CheckDestination()
    data = mig.execute(task)
    driver.inject_fault("cleanup_live_migration_destination_check", message="nfs stale")
    mig.revert(task, data)  # logged, not raised
    assert probe_file(uuid) in instance_files(driver, SHARED, uuid)


def test_check_destination_revert_after_a_late_failure_removes_the_probe(
        migration, driver, uuid):
    mig = migration(LOCAL, upto="check-can-live-migrate-destination")
    before = mig.state(side_effects=False)
    driver.inject_fault("check_can_live_migrate_destination", instance=uuid, when="after",
                        message="reply lost")
    task = live_checks.CheckDestination()
    with pytest.raises(exc.InjectedFault) as err:
        mig.execute(task)
    assert probe_file(uuid) in instance_files(driver, LOCAL, uuid)
    mig.revert(task, failure(err.value))
    assert probe_file(uuid) not in instance_files(driver, LOCAL, uuid)
    assert mig.state(side_effects=False) == before


# -- check-can-live-migrate-source ------------------------------------------------

@pytest.mark.parametrize("dest, block, shared", [(SHARED, False, True), (LOCAL, True, False)])
def test_check_source_decides_block_migration_from_the_probe(dest, block, shared, migration):
    mig = migration(dest, upto="check-can-live-migrate-source")
    before = mig.state()
    data = mig.execute(live_checks.CheckSource())
    assert data == {"source": SOURCE, "dest": dest, "block_migration": block,
                    "is_shared_instance_path": shared}
    assert mig.store["source_check_data"] == data
    # only the migration record learns the decision
    after = mig.state()
    assert after["migration"]["block_migration"] is block
    after["migration"]["block_migration"] = None
    assert after == before


@pytest.mark.parametrize("dest, block, error", [
    (SHARED, True, exc.InvalidSharedStorage), (LOCAL, False, exc.InvalidLocalStorage),
])
def test_check_source_refuses_the_wrong_kind_of_migration(dest, block, error, migration):
    mig = migration(dest)
    mig.store["block_migration"] = block  # as if requested; the API refuses it earlier
    mig.run_until("check-can-live-migrate-source")
    before = mig.state()
    with pytest.raises(error):
        mig.execute(live_checks.CheckSource())
    assert mig.state() == before


@DESTS
def test_no_probe_file_is_left_once_the_migration_completed(dest, migration, driver, uuid):
    mig = migration(dest, upto="complete-live-migration")
    mig.execute(live_post.CompleteLiveMigration())
    assert mig.migration()["status"] == "completed"
    for host in (SOURCE, SHARED, LOCAL):
        assert probe_file(uuid) not in instance_files(driver, host, uuid)


def test_check_source_after_an_earlier_migration_still_needs_block_migration(
        migration, driver, uuid):
    first = migration(LOCAL, upto="complete-live-migration")
    first.execute(live_post.CompleteLiveMigration())
    second = migration(SHARED, upto="check-can-live-migrate-source")
    assert second.store["source_host"] == LOCAL
    data = second.execute(live_checks.CheckSource())
    assert (data["block_migration"], data["is_shared_instance_path"]) == (True, False)


# -- bind-destination-ports ---------------------------------------------------------

@DESTS
def test_bind_ports_adds_inactive_destination_bindings(dest, migration, db, uuid):
    mig = migration(dest, upto="bind-destination-ports")
    ports = db.list_ports(uuid)
    info = mig.execute(live_prepare.BindDestinationPorts())
    assert info == [{"port_id": p["id"], "mac": p["mac"], "network_id": p["network_id"]}
                    for p in ports]
    assert len(info) == 2
    assert mig.state()["snapshot"]["bindings"] == sorted(
        [(p["id"], SOURCE, "ACTIVE") for p in ports]
        + [(p["id"], dest, "INACTIVE") for p in ports])
    assert {b["migration_uuid"] for b in db.list_port_bindings(uuid, host=dest)} == {mig.id}


def test_bind_ports_revert_after_a_failure_removes_the_bindings(migration, db, uuid):
    mig = migration(upto="bind-destination-ports")
    before = mig.state()
    task = live_prepare.BindDestinationPorts()
    mig.execute(task)
    mig.revert(task, failure(exc.DriverError("died after the insert")))
    assert db.list_port_bindings(uuid, host=SHARED) == []
    assert mig.state() == before


# -- connect-destination-volumes --------------------------------------------------

@DESTS
def test_connect_volumes_exports_every_volume_to_the_destination(dest, migration, db, uuid):
    mig = migration(dest, upto="connect-destination-volumes")
    (bdm,) = db.list_block_devices(uuid)
    info = mig.execute(live_prepare.ConnectDestinationVolumes())
    assert info == [{"volume_id": bdm["volume_id"], "device": "/dev/vda"}]
    assert mig.state()["snapshot"]["volume_connections"] == sorted(
        [(bdm["volume_id"], SOURCE), (bdm["volume_id"], dest)])


def test_connect_volumes_revert_after_a_failure_removes_the_connection(migration, db, uuid):
    mig = migration(upto="connect-destination-volumes")
    before = mig.state()
    task = live_prepare.ConnectDestinationVolumes()
    mig.execute(task)
    mig.revert(task, failure(exc.DriverError("died after the export")))
    assert db.list_volume_connections(uuid, host=SHARED) == []
    assert mig.state() == before


def test_connect_volumes_revert_keeps_them_once_the_instance_lives_there(migration, db, uuid):
    mig = migration(upto="connect-destination-volumes")
    task = live_prepare.ConnectDestinationVolumes()
    result = mig.execute(task)
    mig.run_until("activate-destination-ports")  # includes recording the move
    assert mig.instance()["host"] == SHARED
    mig.revert(task, result)
    assert [v["host"] for v in db.list_volume_connections(uuid)] == [SOURCE, SHARED]


# -- pre-live-migration -------------------------------------------------------------

@DESTS
def test_pre_live_migration_prepares_the_destination_hypervisor(dest, migration, driver,
                                                                 db, uuid):
    mig = migration(dest, upto="pre-live-migration")
    before = mig.state()["snapshot"]
    mig.execute(live_prepare.PreLiveMigration())
    snap = mig.state()["snapshot"]
    ports = sorted(p["id"] for p in db.list_ports(uuid))
    (bdm,) = db.list_block_devices(uuid)
    assert snap["vifs"][dest] == [(p, uuid) for p in ports]
    assert snap["hv_volumes"][dest] == [(bdm["volume_id"], uuid)]
    assert snap["guests"][dest] == []
    assert instance_dir(uuid) in snap["files"][dest]
    # the source is untouched
    for key in ("guests", "vifs", "hv_volumes"):
        assert snap[key][SOURCE] == before[key][SOURCE]
    assert driver.side_effects(uuid)[("pre_live_migration", dest)] == 1


@DESTS
def test_pre_live_migration_revert_after_a_late_failure_cleans_the_destination(
        dest, migration, driver, uuid):
    mig = migration(dest, upto="pre-live-migration")
    before = mig.state(side_effects=False)
    driver.inject_fault("pre_live_migration", instance=uuid, when="after")
    task = live_prepare.PreLiveMigration()
    with pytest.raises(exc.InjectedFault) as err:
        mig.execute(task)
    assert driver.vifs(dest) != []
    mig.revert(task, failure(err.value))
    assert mig.state(side_effects=False) == before


def test_pre_live_migration_revert_logs_a_driver_error_instead_of_raising(
        migration, driver, uuid, caplog):
    mig = migration(upto="pre-live-migration")
    task = live_prepare.PreLiveMigration()
    mig.execute(task)
    driver.inject_fault("rollback_live_migration_at_destination", message="host gone")
    mig.revert(task)
    assert "left for the operator: host gone" in caplog.text
    assert driver.vifs(SHARED) != []


def test_pre_live_migration_passes_on_the_migrate_data_the_driver_returns(
        migration, driver, monkeypatch):
    mig = migration(upto="pre-live-migration")
    real = driver.pre_live_migration

    def extending(*args, **kwargs):
        return dict(real(*args, **kwargs), target_connect_addr="192.0.2.2")

    monkeypatch.setattr(driver, "pre_live_migration", extending)
    result = mig.execute(live_prepare.PreLiveMigration())
    assert result == dict(mig.store["source_check_data"], target_connect_addr="192.0.2.2")
    assert mig.store["migrate_data"] == result


# -- live-migration -----------------------------------------------------------------

def _started(driver, uuid):
    return [e for e in driver.timeline(uuid) if e["event"] == "migration.started"]


@DESTS
def test_live_migration_copies_the_guest_to_the_destination(dest, migration, driver, uuid):
    mig = migration(dest, upto="live-migration")
    summary = mig.execute(live_migrate.LiveMigrate())
    assert driver.guests(SOURCE) == []
    assert [(g["uuid"], g["state"], g["persistent"]) for g in driver.guests(dest)] == [
        (uuid, "running", True)]
    got = mig.migration()
    assert got["status"] == "running"
    assert got["memory_processed_mb"] >= 2048 and got["memory_remaining_mb"] == 0
    assert got["iteration"] == summary["iteration"] >= 1
    assert got["downtime_ms"] == summary["downtime_ms"] > 0
    assert summary["post_copy"] is False
    assert [e["event"] for e in driver.timeline(uuid)][-2:] == [
        "migration.started", "migration.completed"]
    # the database does not know yet: that is record-instance-on-destination
    assert mig.instance()["host"] == SOURCE


def test_live_migration_again_after_completion_starts_no_new_job(migration, driver, uuid):
    mig = migration(upto="live-migration")
    task = live_migrate.LiveMigrate()
    first = mig.execute(task)
    once = mig.state()
    assert mig.execute(task) == first
    assert mig.state() == once
    assert driver.side_effects(uuid)[("live_migration", SOURCE)] == 1
    assert len(_started(driver, uuid)) == 1


def test_live_migration_again_reattaches_to_a_running_job(migration, driver, uuid):
    mig = migration(upto="live-migration")
    start_copy_then_fail(driver, uuid)
    task = live_migrate.LiveMigrate()
    with pytest.raises(exc.InjectedFault):
        mig.execute(task)
    assert [g["state"] for g in driver.guests(SHARED)] == ["paused"]  # incoming
    mig.execute(task)
    assert [g["state"] for g in driver.guests(SHARED)] == ["running"]
    assert driver.side_effects(uuid)[("live_migration", SOURCE)] == 1
    assert len(_started(driver, uuid)) == 1


def test_live_migration_again_records_a_job_that_finished_unwatched(migration, driver, uuid):
    mig = migration(upto="live-migration")
    start_copy_then_fail(driver, uuid)
    task = live_migrate.LiveMigrate()
    with pytest.raises(exc.InjectedFault):
        mig.execute(task)
    # the controller is gone; the hypervisor carries the copy to its end
    inst = db_api.instance_to_driver(mig.instance())
    while driver.get_migration_job(SOURCE, inst)["status"] == "running":
        pass
    summary = mig.execute(task)
    got = mig.migration()
    assert summary["downtime_ms"] > 0
    assert (got["memory_remaining_mb"], got["downtime_ms"], got["iteration"]) == (
        0, summary["downtime_ms"], summary["iteration"])


def test_live_migration_again_in_post_copy_watches_the_job_to_its_end(
        migration, driver, uuid, conf, db):
    conf.set_override("live_migration_permit_post_copy", True, group="migration")
    mig = migration(upto="live-migration")
    db.update_migration(mig.id, force_complete_requested=True)
    # the switch to post-copy happens, then the controller loses the reply
    driver.inject_fault("live_migration_force_complete", instance=uuid, when="after")
    task = live_migrate.LiveMigrate()
    with pytest.raises(exc.InjectedFault):
        mig.execute(task)
    assert [g["state"] for g in driver.guests(SHARED)] == ["running"]
    assert [g["state"] for g in driver.guests(SOURCE)] == ["paused"]
    # the rest of the post-copy takes more than one more poll (the fake
    # finishes it in one): the next poll finds it still running
    driver.inject_fault("get_migration_job", action="hang", instance=uuid)
    summary = mig.execute(task)
    assert driver.guests(SOURCE) == []
    assert "migration.completed" in [e["event"] for e in driver.timeline(uuid)]
    assert summary["post_copy"] is True and summary["downtime_ms"] is not None


def test_live_migration_revert_with_the_guest_on_the_destination_stops_the_rollback(
        migration):
    mig = migration(upto="live-migration")
    task = live_migrate.LiveMigrate()
    result = mig.execute(task)
    after = mig.state()
    for _ in range(2):
        with pytest.raises(live_migrate.PointOfNoReturn, match=f"already runs on {SHARED}"):
            mig.revert(task, result)
    assert mig.state() == after


@DESTS
def test_live_migration_revert_aborts_a_running_job(dest, migration, driver, uuid):
    mig = migration(dest, upto="live-migration")
    before = mig.state()["snapshot"]
    start_copy_then_fail(driver, uuid)
    task = live_migrate.LiveMigrate()
    with pytest.raises(exc.InjectedFault) as err:
        mig.execute(task)
    assert [g["state"] for g in driver.guests(dest)] == ["paused"]
    mig.revert(task, failure(err.value))
    assert [(g["uuid"], g["state"]) for g in driver.guests(SOURCE)] == [(uuid, "running")]
    assert driver.guests(dest) == []
    assert mig.state()["snapshot"] == before
    assert driver.side_effects(uuid)[("live_migration_abort", SOURCE)] == 1
    assert "migration.cancelled" in [e["event"] for e in driver.timeline(uuid)]
    once = mig.state()
    mig.revert(task, failure(err.value))
    assert mig.state() == once


def test_live_migration_revert_without_a_job_changes_nothing(migration, db):
    mig = migration(upto="live-migration")
    db.update_migration(mig.id, abort_requested=True)
    task = live_migrate.LiveMigrate()
    before = mig.state()
    with pytest.raises(exc.MigrationAborted, match="aborted before the copy") as err:
        mig.execute(task)
    assert mig.state() == before
    mig.revert(task, failure(err.value))
    assert mig.state() == before


def test_live_migration_refuses_a_migration_that_already_ended(migration, db, driver, uuid):
    mig = migration(upto="live-migration")
    db.update_migration(mig.id, status="failed")
    with pytest.raises(exc.InvalidMigrationState, match="is failed, cannot run"):
        mig.execute(live_migrate.LiveMigrate())
    assert _started(driver, uuid) == []


# -- the post steps -------------------------------------------------------------------

@DESTS
def test_record_instance_moves_it_and_its_usage_to_the_destination(dest, migration, db):
    mig = migration(dest, upto="record-instance-on-destination")
    assert mig.execute(live_post.RecordInstanceOnDestination()) is None
    inst = mig.instance()
    assert (inst["host"], inst["power_state"], inst["task_state"]) == (
        dest, "running", "migrating")
    assert db.list_claims() == []
    usage = mig.state()["snapshot"]["usage"]
    assert usage[SOURCE] == (0, 0, 0) and usage[dest] == (2048, 2, 20)


@DESTS
def test_activate_ports_leaves_only_the_destination_binding_active(dest, migration, db, uuid):
    mig = migration(dest, upto="activate-destination-ports")
    mig.execute(live_post.ActivateDestinationPorts())
    assert mig.state()["snapshot"]["bindings"] == sorted(
        (p["id"], dest, "ACTIVE") for p in db.list_ports(uuid))


@DESTS
def test_post_at_source_unplugs_and_disconnects_the_source(dest, migration, driver, uuid):
    mig = migration(dest, upto="post-live-migration-at-source")
    before = mig.state()["snapshot"]
    assert before["vifs"][SOURCE] and before["hv_volumes"][SOURCE]
    mig.execute(live_post.PostLiveMigrationAtSource())
    after = mig.state()["snapshot"]
    assert after["vifs"][SOURCE] == [] and after["hv_volumes"][SOURCE] == []
    assert after["vifs"][dest] == before["vifs"][dest]
    assert after["hv_volumes"][dest] == before["hv_volumes"][dest]
    assert driver.side_effects(uuid)[("post_live_migration_at_source", SOURCE)] == 1


@DESTS
def test_terminate_source_volume_connections(dest, migration, db, uuid):
    mig = migration(dest, upto="terminate-source-volume-connections")
    mig.execute(live_post.TerminateSourceVolumeConnections())
    (bdm,) = db.list_block_devices(uuid)
    assert mig.state()["snapshot"]["volume_connections"] == [(bdm["volume_id"], dest)]


@DESTS
def test_post_at_destination_leaves_a_persistent_running_guest(dest, migration, db, driver,
                                                                uuid):
    mig = migration(dest, upto="post-live-migration-at-destination")
    db.update_instance(uuid, power_state="nostate")  # to see the step write it
    mig.execute(live_post.PostLiveMigrationAtDestination())
    assert mig.instance()["power_state"] == "running"
    assert [(g["state"], g["persistent"]) for g in driver.guests(dest)] == [("running", True)]


@pytest.mark.parametrize("dest, source_files_left", [
    (SHARED, True),   # shared storage: the directory is the destination's too
    (LOCAL, False),   # block migration: the source copy is deleted
])
def test_cleanup_source_destroys_disks_only_without_shared_storage(
        dest, source_files_left, migration, driver, uuid):
    mig = migration(dest, upto="cleanup-source")
    assert instance_dir(uuid) in instance_files(driver, SOURCE, uuid)
    mig.execute(live_post.CleanupSource())
    assert (instance_dir(uuid) in instance_files(driver, SOURCE, uuid)) is source_files_left
    assert instance_dir(uuid) in instance_files(driver, dest, uuid)


@DESTS
def test_complete_marks_the_migration_completed_and_releases_the_instance(dest, migration):
    mig = migration(dest, upto="complete-live-migration")
    before = mig.state()["snapshot"]
    assert mig.execute(live_post.CompleteLiveMigration()) == "completed"
    got = mig.migration()
    assert (got["status"], got["current_step"], got["failed_step"]) == (
        "completed", None, None)
    assert got["finished_at"] is not None
    after = mig.state()["snapshot"]
    assert after["instance"]["task_state"] is None
    assert (after["instance"]["host"], after["instance"]["vm_state"]) == (dest, "active")
    after["instance"]["task_state"] = "migrating"
    assert after == before


def test_complete_marks_error_when_a_post_step_failed(migration):
    mig = migration(upto="complete-live-migration")
    mig.db.update_migration(mig.id, failed_step="cleanup-source", error="cleanup-source: x")
    assert mig.execute(live_post.CompleteLiveMigration()) == "error"
    got = mig.migration()
    assert (got["status"], got["failed_step"], got["error"]) == (
        "error", "cleanup-source", "cleanup-source: x")
    assert mig.instance()["task_state"] is None


@pytest.mark.parametrize("step", POST_STEPS)
def test_post_step_revert_changes_nothing(step, migration):
    mig = migration(LOCAL, upto=step)
    task = fresh(step)
    result = mig.execute(task)
    after = mig.state()
    assert mig.revert(task, result) is None
    assert mig.state() == after


# -- a post step that fails ----------------------------------------------------------

FAILING_POST_STEPS = pytest.mark.parametrize("step, method, host", [
    ("post-live-migration-at-source", "post_live_migration_at_source", SOURCE),
    ("post-live-migration-at-destination", "post_live_migration_at_destination", LOCAL),
    ("cleanup-source", "cleanup", SOURCE),
])


@FAILING_POST_STEPS
def test_post_step_that_keeps_failing_is_recorded_not_raised(step, method, host, migration,
                                                             driver, uuid):
    mig = migration(LOCAL, upto=step)
    driver.inject_fault(method, host=host, instance=uuid, count=-1, message="hv gone")
    before = mig.state()
    result = mig.execute(fresh(step))
    assert result == {"failed": f"{step}: hv gone"}
    got = mig.migration()
    assert (got["failed_step"], got["error"], got["status"]) == (
        step, f"{step}: hv gone", "running")
    after = mig.state()
    for key in ("failed_step", "error"):
        after["migration"][key] = None
    assert after == before


@pytest.mark.parametrize("attempts", [1, 3, 5])
def test_post_step_gives_up_after_post_migration_attempts(attempts, migration, driver, uuid,
                                                          conf):
    conf.set_override("post_migration_attempts", attempts, group="migration")
    mig = migration(LOCAL, upto="post-live-migration-at-source")
    driver.inject_fault("post_live_migration_at_source", instance=uuid, count=attempts)
    task = live_post.PostLiveMigrationAtSource()
    assert "failed" in mig.execute(task)
    assert driver.vifs(SOURCE) != []
    # every injected failure was used: a single attempt now succeeds
    conf.set_override("post_migration_attempts", 1, group="migration")
    assert mig.execute(task) is None
    assert driver.vifs(SOURCE) == []


@pytest.mark.parametrize("attempts", [2, 3, 5])
def test_post_step_succeeds_within_post_migration_attempts(attempts, migration, driver, uuid,
                                                           conf):
    conf.set_override("post_migration_attempts", attempts, group="migration")
    mig = migration(LOCAL, upto="post-live-migration-at-source")
    driver.inject_fault("post_live_migration_at_source", instance=uuid, count=attempts - 1)
    assert mig.execute(live_post.PostLiveMigrationAtSource()) is None
    got = mig.migration()
    assert (got["failed_step"], got["error"]) == (None, None)
    assert driver.vifs(SOURCE) == []


def test_the_first_failed_post_step_is_the_one_recorded(migration, driver, uuid):
    mig = migration(LOCAL, upto="post-live-migration-at-source")
    driver.inject_fault("post_live_migration_at_source", instance=uuid, count=-1,
                        message="source gone")
    driver.inject_fault("cleanup", instance=uuid, count=-1, message="disk busy")
    mig.run_until("complete-live-migration")
    assert mig.results["cleanup-source"] == {"failed": "cleanup-source: disk busy"}
    got = mig.migration()
    assert (got["failed_step"], got["error"]) == (
        "post-live-migration-at-source", "post-live-migration-at-source: source gone")
    assert mig.execute(live_post.CompleteLiveMigration()) == "error"
