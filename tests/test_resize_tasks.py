"""Every task of the resize, confirm-resize and revert-resize flows on its
own, against the SQLite state database and the fake hypervisors: execute,
revert, and idempotency (executing twice or reverting twice leaves exactly
the state of doing it once).

Each test accepts a real request through the API (a resize of vm-1 from
host-a, m2 → m4; for confirm and revert, a finished resize first) and runs
the real steps the flow runs before the task under test, feeding them the
store values the flow would; then it calls the task directly.  host-b
shares storage with host-a, host-c does not.
"""
import inspect

import pytest
from taskflow.types.failure import Failure

import task_checks
from helpers import snapshot
from migrateflow import api, cloud
from migrateflow import exceptions as exc
from migrateflow.flows import confirm_resize, resize, revert_resize
from migrateflow.keys import StoreKey
from migrateflow.tasks import resize_checks, resize_confirm

SOURCE, SHARED, LOCAL = "host-a", "host-b", "host-c"
DESTS = pytest.mark.parametrize("dest", [SHARED, LOCAL])
FLOWS = {"resize": resize, "confirm": confirm_resize, "revert": revert_resize}


def flow_tasks(kind):
    return list(task_checks.tasks_of(FLOWS[kind].build()))


STEPS = {kind: [t.name for t in flow_tasks(kind)] for kind in FLOWS}
ALL_STEPS = [(kind, step) for kind in FLOWS for step in STEPS[kind]]
#: steps whose revert undoes what their execute did
UNDOING = [("resize", s) for s in (
    "claim-resize-resources", "migrate-disk-and-power-off",
    "terminate-source-volume-connections", "connect-destination-volumes",
    "migrate-ports-to-destination")] + [
    ("revert", s) for s in ("revert-ports-to-source", "revert-volumes-to-source")]


class Request:
    """A request accepted through the API and the flow store as the real
    steps run so far have filled it."""

    def __init__(self, db, driver, instance_id, kind, dest):
        self.db, self.driver, self.kind, self.instance_id = db, driver, kind, instance_id
        client = api.MigrationAPI()
        mig, store = client._accept_resize(instance_id, "m4", dest)
        if kind != "resize":
            engine_store = {str(k): v for k, v in store.items()}
            _run(flow_tasks("resize"), engine_store, dest)
            status = "confirming" if kind == "confirm" else "reverting"
            client._claim_finished(mig["uuid"], status, status)
            mig = db.get_migration(mig["uuid"])
            store = {StoreKey.MIGRATION_ID: mig["uuid"], StoreKey.INSTANCE_ID: instance_id,
                     StoreKey.SOURCE_HOST: SOURCE, StoreKey.DEST_HOST: dest,
                     StoreKey.OLD_FLAVOR: mig["old_flavor"], StoreKey.POWER_ON: True}
            if kind == "revert":
                db.update_instance(instance_id, task_state="resize_reverting")
        self.id = mig["uuid"]
        self.store = {str(k): v for k, v in store.items()}
        self.store.setdefault("candidate", dest)
        self.done = 0

    def args(self, task, method=None):
        """The store values ``task`` requires (only those ``method`` takes,
        as TaskFlow passes them)."""
        return _args(task, self.store, method)

    def execute(self, task):
        result = task.execute(**self.args(task, task.execute))
        for key in task.provides:
            self.store[str(key)] = result
        if self.done < len(STEPS[self.kind]) and task.name == STEPS[self.kind][self.done]:
            self.done += 1
        return result

    def revert(self, task, result=None, flow_failures=None):
        return task.revert(result=result, flow_failures=flow_failures or {},
                           **self.args(task))

    def run_until(self, step):
        for task in flow_tasks(self.kind)[self.done:STEPS[self.kind].index(step)]:
            self.execute(task)

    def state(self, side_effects=True):
        mig = self.db.get_migration(self.id)
        mig.pop("updated_at")
        state = {"snapshot": snapshot(self.db, self.driver, self.instance_id),
                 "migration": mig, "reservations": [
                     (r["cores"], r["ram_mb"]) for r in self.db.list_quota_reservations()]}
        if side_effects:
            state["side_effects"] = self.driver.counters()
        return state


def _args(task, store, method=None):
    names = set(task.requires)
    if method is not None:
        params = inspect.signature(method).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names &= set(params)
    return {name: store[name] for name in names}


def _run(tasks, store, dest):
    store["candidate"] = dest
    for task in tasks:
        result = task.execute(**_args(task, store, task.execute))
        for key in task.provides:
            store[str(key)] = result


@pytest.fixture
def request_(db, driver):
    cloud.add_host(db, driver, SOURCE, shared_storage="nfs-1")
    cloud.add_host(db, driver, SHARED, shared_storage="nfs-1")
    cloud.add_host(db, driver, LOCAL)
    db.create_flavor("m2", memory_mb=2048, vcpus=2, disk_gb=20)
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    inst = cloud.add_instance(db, driver, "vm-1", SOURCE, ports=2, volumes=1,
                              flavor_name="m2")

    def make(kind="resize", dest=LOCAL, upto=None):
        req = Request(db, driver, inst["uuid"], kind, dest)
        if upto is not None:
            req.run_until(upto)
        return req
    return make


def fresh(kind, step):
    return {t.name: type(t) for t in flow_tasks(kind)}[step]()


# -- every step: idempotency ---------------------------------------------------

@DESTS
@pytest.mark.parametrize("kind, step", ALL_STEPS)
def test_execute_twice_leaves_the_state_of_once(kind, step, dest, request_):
    task_checks.execute_twice_is_once(request_(kind, dest, upto=step), fresh(kind, step))


@DESTS
@pytest.mark.parametrize("kind, step", ALL_STEPS)
def test_revert_twice_leaves_the_state_of_once(kind, step, dest, request_):
    task_checks.revert_twice_is_once(request_(kind, dest, upto=step), fresh(kind, step))


@DESTS
@pytest.mark.parametrize("kind, step", UNDOING)
def test_revert_restores_the_state_before_execute(kind, step, dest, request_):
    def without_the_start_steps_part(state):
        # the status and task_state a step moved on are the start step's to end
        for key in ("status", "current_step"):
            state["migration"].pop(key)
        state["snapshot"]["instance"].pop("task_state")
        return state

    task_checks.revert_undoes_execute(request_(kind, dest, upto=step), fresh(kind, step),
                                      without_the_start_steps_part)


@DESTS
def test_a_failed_step_reverts_too(dest, request_, driver):
    """A driver step that failed after its side effect is reverted with a
    Failure result: the revert must still undo the effect."""
    req = request_("resize", dest, upto="migrate-disk-and-power-off")
    before = req.state(side_effects=False)["snapshot"]
    driver.inject_fault("migrate_disk_and_power_off", when="after")
    task = fresh("resize", "migrate-disk-and-power-off")
    with pytest.raises(exc.InjectedFault) as raised:
        req.execute(task)
    req.revert(task, Failure.from_exception(raised.value))
    after = req.state(side_effects=False)["snapshot"]
    for state in (before, after):
        state["instance"].pop("task_state")  # the start step's to end
    assert after == before


@DESTS
def test_finish_migration_revert_brings_the_source_back(dest, request_, driver):
    """Its revert does not stop at the state before it: the guest it made
    is destroyed and the kept source guest restarted (what the rollback's
    earlier reverts then find done)."""
    req = request_("resize", dest, upto="finish-migration")
    task = fresh("resize", "finish-migration")
    req.revert(task, req.execute(task))
    uuid = req.instance_id
    assert driver.get_guest(dest, uuid) is None
    assert [(g["state"], g["memory_mb"]) for g in driver.guests(SOURCE)] == [("running", 2048)]
    assert {v["port_id"] for v in driver.vifs(SOURCE)} == {
        p["id"] for p in req.db.list_ports(uuid)}


# -- start steps: the end of every rollback ------------------------------------

def test_start_resize_revert_ends_in_error_and_releases_everything(request_):
    req = request_("resize", LOCAL, upto="check-instance-for-resize")
    fails = {"finish-migration": Failure.from_exception(exc.DriverError("no"))}
    req.revert(resize_checks.StartResize(), flow_failures=fails)
    mig = req.db.get_migration(req.id)
    assert (mig["status"], mig["error"]) == ("error", "finish-migration: no")
    inst = req.db.get_instance(req.instance_id)
    assert (inst["task_state"], inst["vm_state"], inst["power_state"], inst["host"]) == (
        None, "active", "running", SOURCE)
    assert req.db.list_quota_reservations() == []


def test_start_resize_refuses_a_migration_not_in_flight(request_):
    req = request_("resize", LOCAL, upto="start-resize")
    req.db.update_migration(req.id, status="error")
    with pytest.raises(exc.InvalidMigrationState, match="not pre-migrating"):
        req.execute(resize_checks.StartResize())


@pytest.mark.parametrize("failed, status", [
    ("check-revert-resize", "finished"), ("finish-revert-migration", "error"),
    ("complete-revert-resize", "error")])
def test_start_revert_revert_depends_on_what_failed(failed, status, request_):
    req = request_("revert", LOCAL, upto="check-revert-resize")
    fails = {failed: Failure.from_exception(exc.DriverError("boom"))}
    req.revert(resize_confirm.StartRevertResize(), flow_failures=fails)
    mig = req.db.get_migration(req.id)
    assert (mig["status"], mig["error"]) == (status, f"revert failed: {failed}: boom")
    inst = req.db.get_instance(req.instance_id)
    assert inst["task_state"] is None
    assert inst["vm_state"] == ("resized" if status == "finished" else "error")


def test_check_revert_refuses_when_the_source_lost_the_guest(request_, driver):
    req = request_("revert", LOCAL, upto="check-revert-resize")
    driver.destroy(SOURCE, {"uuid": req.instance_id}, destroy_disks=False)
    before = req.state()
    with pytest.raises(exc.InstanceInvalidState, match="nothing to revert to"):
        req.execute(resize_confirm.CheckRevertResize())
    assert req.state() == before


def test_check_resize_candidate_refuses_a_full_host(request_, db):
    req = request_("resize", LOCAL, upto="check-resize-candidate")
    db.update_host(LOCAL, memory_used_mb=64000)
    before = req.state()
    with pytest.raises(exc.InsufficientResources, match="instance needs 4096 MB"):
        req.execute(resize_checks.CheckResizeCandidate())
    assert req.state() == before


def test_check_instance_for_resize_refuses_a_missing_guest(request_, driver):
    req = request_("resize", LOCAL, upto="check-instance-for-resize")
    driver.destroy(SOURCE, {"uuid": req.instance_id}, destroy_disks=False)
    with pytest.raises(exc.InstanceInvalidState, match="has no guest"):
        req.execute(resize_checks.CheckInstanceForResize())
