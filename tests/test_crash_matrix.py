"""Crash matrix of the live-migration flow ("Durable execution").

Each case runs the migration of the small cloud's instance from host-a to
host-c (a block migration: every hypervisor step has a side effect) through
the jobboard: conductor A (a real process, ``tests/crash_conductor.py``)
claims the job and is SIGKILLed at a chosen point, conductor B takes the job
over once A's ZooKeeper session expired (session timeout 1 s) and finishes
it.  Then, for every case:

* the migration reached its terminal status (``completed``; ``failed`` for
  the rollback cases, ``cancelled`` for the operator-abort ones) and its
  flow its final state (SUCCESS / REVERTED); the board holds no job;
* the instance is active, task_state None, on exactly one host in the
  database and in the fake driver (running there, absent elsewhere);
* no resource claim, no port binding, no volume connection (database and
  hypervisor), no VIF, no probe file, no instance directory is left
  anywhere but on that host; host usage counts the instance there only;
* no side effect was applied twice: the fake driver's counters are exactly
  those of a run without crash (``EXPECTED_SIDE_EFFECTS``, each 1), and the
  journal both conductors write shows that no step finished by A was run
  again by B, no revert finished by A was run again by B, and every step
  succeeded (rollbacks: was reverted) exactly once.

Kill points (ids):

* ``kill-at-ATOM-STATE``: every atom of the flow (the retry controller
  included) × {RUNNING, SUCCESS}, plus ``kill-at-flow-SUCCESS``: the kill
  comes from a listener in A right after TaskFlow persisted that state
  (checked by reading it back before B starts);
* ``driver-kill-after-METHOD``: the fake driver SIGKILLs A right after the
  hypervisor call's side effect was committed (the step is still RUNNING;
  B runs it again and must not apply the effect twice);
  ``driver-kill-after-get_migration_job-running|completed``: killed while
  watching the copy, once in the middle of it, once when it had completed;
* ``hang-METHOD``: the hypervisor call hangs (before its side effect), the
  test SIGKILLs A; ``hang-get_migration_job-copy-stalled``: the copy makes
  no progress, the test SIGKILLs A, B re-attaches to the running copy;
* ``rollback-…``: ``live_migration`` fails after the copy started, the
  rollback runs and A is killed at every ``ATOM:REVERTING``/``REVERTED`` (and
  ``live-migration:FAILURE``, ``flow:REVERTED``), in or after the rollback's
  hypervisor calls (``rollback-driver-kill-after-…``, ``rollback-hang-…``);
  ``rollback-from-pre_live_migration-…``: ``pre_live_migration`` fails after
  plugging the destination; ``abort-…``: the operator aborts a copy in
  progress and A dies inside the abort.

The module prints the size of the matrix (cases run / passed / xfailed) at
its end.  Conductors are forked from one warm "zygote" process (see
tests/crash_conductor.py) so a case pays the session expiry, not 1.2 s of
imports; the test posts the job with the API, in this process.
"""
import collections
import contextlib
import dataclasses
import os
import signal
import sys
import time

import pytest
from futurist import _thread as futurist_thread
from taskflow import states as st

from crash_harness import FINISH_TIMEOUT, WORKER_IDLE, Env
from crash_harness import board_jobs as _board_jobs
from crash_harness import journal as _journal
from crash_harness import persisted_state as _persisted_state
from crash_harness import usage as _usage
from crash_harness import wait_until as _wait_until
from migrateflow import engine, graph
from migrateflow.conf import CONF
from migrateflow.flows import live_migration

pytestmark = pytest.mark.slow

SOURCE, DEST = "host-a", "host-c"
HOSTS = ("host-a", "host-b", "host-c")
STORAGE = {"host-a": "nfs-1", "host-b": "nfs-1", "host-c": "host-c"}
INSTANCES_DIR = "/var/lib/migrateflow/instances"

#: every atom of the flow, in the order it runs (the retry controller included)
ATOMS = graph.execution_order(graph.describe(live_migration.build()))
#: the atoms that run before the copy is started: what a rollback reverts
ROLLBACK_ATOMS = ATOMS[:ATOMS.index("live-migration") + 1]

#: side effects of the migration without any crash ((method, host): count);
#: the spawn is the small cloud's.  post_live_migration_at_destination
#: changes nothing in the fake (the completed copy already made the guest
#: persistent and running there), so it counts no side effect.
_PREPARED = {  # every scenario got the destination ready
    ("spawn", "host-a"): 1,
    ("check_can_live_migrate_destination", "host-c"): 1,
    ("cleanup_live_migration_destination_check", "host-c"): 1,
    ("pre_live_migration", "host-c"): 1,
}
_COPY_ABORTED = {
    ("live_migration", "host-a"): 1,
    ("live_migration_abort", "host-a"): 1,
    ("rollback_live_migration_at_destination", "host-c"): 1,
}
EXPECTED_SIDE_EFFECTS = {
    "completed": {**_PREPARED, ("live_migration", "host-a"): 1,
                  ("post_live_migration_at_source", "host-a"): 1, ("cleanup", "host-a"): 1},
    # live_migration fails after starting the copy: the rollback aborts it
    # and cleans the destination
    "rollback": {**_PREPARED, **_COPY_ABORTED},
    # pre_live_migration fails after plugging the destination: no copy
    "rollback-pre": {**_PREPARED, ("rollback_live_migration_at_destination", "host-c"): 1},
    # the operator aborts the copy in progress
    "abort": {**_PREPARED, **_COPY_ABORTED},
}

#: steps that call the hypervisor → (the call a crash is injected into, its host)
DRIVER_STEPS = {
    "check-instance-and-source": ("get_guest", SOURCE),
    "check-can-live-migrate-destination": ("check_can_live_migrate_destination", DEST),
    "check-can-live-migrate-source": ("check_can_live_migrate_source", SOURCE),
    "cleanup-destination-check": ("cleanup_live_migration_destination_check", DEST),
    "pre-live-migration": ("pre_live_migration", DEST),
    "live-migration": ("live_migration", SOURCE),
    "post-live-migration-at-source": ("post_live_migration_at_source", SOURCE),
    "post-live-migration-at-destination": ("post_live_migration_at_destination", DEST),
    "cleanup-source": ("cleanup", SOURCE),
}
#: the failure that starts each kind of rollback: (method, action, when, host, count)
ROLLBACK_TRIGGER = {
    "rollback": ("live_migration", "raise", "after", SOURCE, 1),
    "rollback-pre": ("pre_live_migration", "raise", "after", DEST, 1),
}
#: the copy makes no progress while this fault is armed (cleared once A died)
STALL = ("get_migration_job", "hang", "before", SOURCE, -1)
FINAL = {"completed": ("completed", st.SUCCESS, DEST),
         "rollback": ("failed", st.REVERTED, SOURCE),
         "rollback-pre": ("failed", st.REVERTED, SOURCE),
         "abort": ("cancelled", st.REVERTED, SOURCE)}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    scenario: str = "completed"  # a key of FINAL
    kill_at: str = None  # "ATOM:STATE", the harness listener in A kills A there
    kill_on_job_status: str = None  # A dies when get_migration_job returns this
    faults: tuple = ()  # (method, action, when, host, count) armed before posting
    hang: str = None  # the method whose hang fault is awaited, then A is SIGKILLed
    stall: bool = False  # SIGKILL A once the copy started (and stalls)
    abort: bool = False  # the operator aborts once the copy started
    interrupted: str = None  # "ATOM:STATE" persisted when A died in the middle of a step
    xfail: str = None  # "BUG: ..." for a known product bug




def _cases():
    cases = []
    for atom in ATOMS:
        for state in (st.RUNNING, st.SUCCESS):
            cases.append(Case(f"kill-at-{atom}-{state}", kill_at=f"{atom}:{state}"))
    cases.append(Case("kill-at-flow-SUCCESS", kill_at="flow:SUCCESS"))
    for step, (method, host) in DRIVER_STEPS.items():
        cases.append(Case(f"driver-kill-after-{method}", interrupted=f"{step}:RUNNING",
                          faults=((method, "kill", "after", host, 1),)))
    for status in ("running", "completed"):
        cases.append(Case(f"driver-kill-after-get_migration_job-{status}",
                          kill_on_job_status=status, interrupted="live-migration:RUNNING"))
    for step, (method, host) in DRIVER_STEPS.items():
        cases.append(Case(f"hang-{method}", faults=((method, "hang", "before", host, 1),),
                          hang=method, interrupted=f"{step}:RUNNING"))
    cases.append(Case("hang-get_migration_job-copy-stalled", faults=(STALL,), stall=True,
                      interrupted="live-migration:RUNNING"))
    # rollbacks: live_migration fails after starting the copy
    trigger = ROLLBACK_TRIGGER["rollback"]
    points = ["live-migration:FAILURE"]
    for atom in reversed(ROLLBACK_ATOMS):
        points += [f"{atom}:{st.REVERTING}", f"{atom}:{st.REVERTED}"]
    points.append(f"flow:{st.REVERTED}")
    for point in points:
        cases.append(Case("rollback-kill-at-" + point.replace(":", "-"), scenario="rollback",
                          kill_at=point, faults=(trigger,)))
    for step, method, host in (("live-migration", "live_migration_abort", SOURCE),
                               ("pre-live-migration", "rollback_live_migration_at_destination",
                                DEST)):
        cases.append(Case(f"rollback-driver-kill-after-{method}", scenario="rollback",
                          faults=(trigger, (method, "kill", "after", host, 1)),
                          interrupted=f"{step}:REVERTING"))
        cases.append(Case(f"rollback-hang-{method}", scenario="rollback",
                          faults=(trigger, (method, "hang", "before", host, 1)), hang=method,
                          interrupted=f"{step}:REVERTING"))
    trigger = ROLLBACK_TRIGGER["rollback-pre"]
    for state in (st.FAILURE, st.REVERTING, st.REVERTED):
        cases.append(Case(f"rollback-from-pre_live_migration-kill-at-pre-live-migration-{state}",
                          scenario="rollback-pre", kill_at=f"pre-live-migration:{state}",
                          faults=(trigger,)))
    # the operator aborts a copy in progress; A dies inside the abort
    cases.append(Case("abort-driver-kill-after-live_migration_abort", scenario="abort",
                      faults=(STALL, ("live_migration_abort", "kill", "after", SOURCE, 1)),
                      abort=True, interrupted="live-migration:RUNNING"))
    cases.append(Case("abort-kill-at-live-migration-FAILURE", scenario="abort",
                      faults=(STALL,), kill_at="live-migration:FAILURE", abort=True))
    return cases


def _group(case_id):
    for prefix, group in (("kill-at-", "boundary"), ("driver-kill-", "driver-kill"),
                          ("hang-", "hang"), ("rollback-", "rollback"), ("abort-", "abort")):
        if case_id.startswith(prefix):
            return group
    raise ValueError(case_id)


CASES = _cases()
GROUPS = collections.Counter(_group(c.id) for c in CASES)
#: 19 atoms × 2 + flow:SUCCESS; 9 hypervisor steps + 2 copy-watch kills;
#: 9 hangs + the stalled copy; rollback: 12 atoms × 2 + FAILURE + flow +
#: 2 kills and 2 hangs inside the rollback's hypervisor calls + 3 from
#: pre_live_migration; 2 operator aborts
MATRIX_SIZE = {"boundary": 39, "driver-kill": 11, "hang": 10, "rollback": 33, "abort": 2}
_results = collections.Counter()


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module", autouse=True)
def matrix_report(request):
    """The matrix's size, printed when the module ends (also with -q)."""
    yield
    run = sum(_results.values())
    line = ("crash matrix: %d cases defined (%s); %d run, %d passed, %d xfailed (known bugs), "
            "%d failed" % (len(CASES), ", ".join(f"{g} {n}" for g, n in GROUPS.items()), run,
                           _results["passed"], _results["xfailed"], _results["failed"]))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(line)
        else:
            print(line)


# -- one case's world -------------------------------------------------------------------
@pytest.fixture
def env(zk_conf, zk_hosts, small_cloud, db, driver, zygote, tmp_path, monkeypatch):
    CONF.set_override("enabled", True, group="jobboard")
    monkeypatch.setattr(futurist_thread.ThreadWorker, "MAX_IDLE_FOR", WORKER_IDLE)
    world = Env(tmp_path, zk_hosts, db, driver, zygote, small_cloud["instance"])
    yield world
    world.stop_all()
    engine.reset()  # closes this process's board while its workers poll fast
    CONF.clear_override("enabled", group="jobboard")


# -- the assertions ---------------------------------------------------------------------
def assert_end_state(env, mig_id, scenario, usage_before):
    """Terminal, on exactly one host, nothing left behind, nothing twice."""
    db, driver, uuid = env.db, env.driver, env.uuid
    status, flow_state, host = FINAL[scenario]
    mig = db.get_migration(mig_id)
    assert mig["status"] == status, f"{mig['status']}: {mig['error']}"
    assert mig["current_step"] is None and mig["failed_step"] is None, \
        (mig["current_step"], mig["failed_step"])
    if scenario in ROLLBACK_TRIGGER:  # the reason survived the crash
        assert f"injected fault in {ROLLBACK_TRIGGER[scenario][0]}" in (mig["error"] or "")
    assert _persisted_state(mig["flow_uuid"], "flow") == flow_state
    inst = db.get_instance(uuid)
    assert (inst["host"], inst["vm_state"], inst["task_state"], inst["power_state"]) == (
        host, "active", None, "running")
    guests = {h: [(g["state"], g["persistent"]) for g in driver.guests(h) if g["uuid"] == uuid]
              for h in HOSTS}
    assert guests == {h: [("running", True)] if h == host else [] for h in HOSTS}
    assert db.list_claims() == []
    ports = {p["id"] for p in db.list_ports(uuid)}
    volumes = {b["volume_id"] for b in db.list_block_devices(uuid)}
    assert ports and volumes
    assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(uuid)} == {
        (p, host, "ACTIVE") for p in ports}
    assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(uuid)} == {
        (v, host) for v in volumes}
    for h in HOSTS:
        expected_here = h == host
        assert {v["port_id"] for v in driver.vifs(h) if v["instance"] == uuid} == (
            ports if expected_here else set()), f"VIFs on {h}"
        assert {v["volume_id"] for v in driver.volume_connections(h)
                if v["instance"] == uuid} == (volumes if expected_here else set()), \
            f"hypervisor volume connections on {h}"
        files = {f["path"] for f in driver.files(h) if uuid in f["path"]}
        assert files == ({f"{INSTANCES_DIR}/{uuid}"} if STORAGE[h] == STORAGE[host]
                         else set()), f"files on {h}"
    moved = dict.fromkeys(usage_before, (0, 0, 0))
    moved[host] = usage_before[SOURCE]
    assert _usage(db) == moved
    assert _board_jobs() == []
    assert driver.side_effects(uuid) == EXPECTED_SIDE_EFFECTS[scenario], \
        "hypervisor side effects differ from a run without crash"


def assert_no_step_twice(env, scenario):
    """From both conductors' journal: B never ran or reverted again what A
    had finished, and every step succeeded (and, in a rollback, was
    reverted) exactly once."""
    # NB: the step B runs again after a kill in its middle emits no RUNNING
    # (REVERTING) in B: TaskFlow skips the notification of a transition to
    # the state already persisted.  Hence exactly-once is counted on SUCCESS
    # and REVERTED, which every finished execute/revert emits.
    events = [e for e in _journal(env.journal) if e[1] != "flow"]
    by = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for label, _kind, name, state in events:
        by[label][state][name] += 1
    a, b = by["A"], by["B"]
    done_by_a = set(a[st.SUCCESS])
    assert not done_by_a & (set(b[st.RUNNING]) | set(b[st.SUCCESS])), \
        f"steps finished by A run again by B: {sorted(done_by_a & set(b[st.SUCCESS]))}"
    reverted_by_a = set(a[st.REVERTED])
    assert not reverted_by_a & set(b[st.REVERTING]), \
        f"reverts finished by A run again by B: {sorted(reverted_by_a & set(b[st.REVERTING]))}"
    succeeded = a[st.SUCCESS] + b[st.SUCCESS]
    reverted = a[st.REVERTED] + b[st.REVERTED]
    assert not [n for n, k in succeeded.items() if k > 1], f"succeeded twice: {succeeded}"
    assert not [n for n, k in reverted.items() if k > 1], f"reverted twice: {reverted}"
    if scenario == "completed":
        assert set(succeeded) == set(ATOMS)
        assert not reverted and not (a[st.REVERTING] + b[st.REVERTING])
    else:
        ran = ROLLBACK_ATOMS if scenario != "rollback-pre" else \
            ROLLBACK_ATOMS[:ROLLBACK_ATOMS.index("pre-live-migration") + 1]
        assert set(reverted) == set(ran), f"reverted: {sorted(reverted)}"
        failed_atom = ran[-1]
        assert set(succeeded) == set(ran) - {failed_atom}


# -- the matrix ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(_params()))
def test_crash(case, env):
    try:
        _run_case(case, env)
    except BaseException:
        _results["xfailed" if case.xfail else "failed"] += 1
        raise
    # strict xfail: a case marked as a bug that passes fails the run
    _results["failed" if case.xfail else "passed"] += 1


_case_start = [0.0]


def _mark(what):
    """CRASH_MATRIX_TIMING=1 (with -s): where a case spends its time."""
    if os.environ.get("CRASH_MATRIX_TIMING"):
        sys.stderr.write(f"  {time.monotonic() - _case_start[0]:6.3f} {what}\n")


def _run_case(case, env):
    _case_start[0] = time.monotonic()
    db, driver = env.db, env.driver
    usage_before = _usage(db)
    fault_ids = {}
    for method, action, when, host, count in case.faults:
        fault_ids[method] = driver.inject_fault(method, action, host=host, instance=env.uuid,
                                                count=count, when=when)
    a = env.start("A", kill_at=case.kill_at, kill_on_job_status=case.kill_on_job_status)
    mig = env.api.live_migrate(env.uuid, host=DEST, wait=False)
    mig_id = mig["uuid"]
    _mark("posted")

    def a_dead():
        return a.poll() is not None

    def copy_started():
        return driver.side_effects(env.uuid).get(("live_migration", SOURCE))

    if case.abort:
        _wait_until(lambda: copy_started() or a_dead(), 30, "the copy to start", env)
        env.api.abort(mig_id)
    if case.hang:
        _wait_until(lambda: env.fault_remaining(fault_ids[case.hang]) == 0 or a_dead(), 30,
                    f"{case.hang} to hang", env)
        assert not a_dead(), f"A died before hanging in {case.hang}\n{env.logs()}"
        a.signal(signal.SIGKILL)
    if case.stall:
        _wait_until(lambda: copy_started() or a_dead(), 30, "the copy to start", env)
        assert not a_dead(), f"A died before the copy started\n{env.logs()}"
        time.sleep(0.05)  # A watches the stalled copy for a few polls
        a.signal(signal.SIGKILL)
    status = a.wait(30)
    _mark("A dead")
    assert status == -signal.SIGKILL, f"conductor A exit status {status}\n{env.logs()}"
    driver.release_hangs()
    driver.clear_faults()  # the stall and any fault A did not reach
    flow_uuid = db.get_migration(mig_id)["flow_uuid"]
    for point in (case.kill_at, case.interrupted):
        if point:
            # a boundary means what it says: that state was persisted before A
            # died; a kill in the middle of a step left it RUNNING (REVERTING)
            name, _, state = point.rpartition(":")
            assert _persisted_state(flow_uuid, name) == state, f"{point}\n{env.logs()}"

    b = env.start("B")
    _mark("B started")
    final = env.api.wait(mig_id, timeout=FINISH_TIMEOUT)
    assert final["status"] in ("completed", "failed", "cancelled", "error"), (
        f"migration still {final['status']} (step {final['current_step']}) after "
        f"{FINISH_TIMEOUT} s\n{env.logs()}")
    _mark("terminal")
    _wait_until(lambda: not _board_jobs(), 15, "conductor B to consume the job", env, 0.05)
    _mark("consumed")
    b.signal(signal.SIGTERM)
    status = b.wait(10)
    _mark("B exited")
    assert status == 0, f"conductor B exit status {status} after SIGTERM\n{env.logs()}"
    try:
        assert_end_state(env, mig_id, case.scenario, usage_before)
        assert_no_step_twice(env, case.scenario)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{env.logs()}") from None


def test_matrix_covers_every_atom():
    """The boundary cases kill at every atom × {RUNNING, SUCCESS}; the
    hypervisor cases cover every step that calls the hypervisor."""
    assert len(ATOMS) == 19 and "choose-destination-retry" in ATOMS
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES) == sum(MATRIX_SIZE.values()) == 95
    assert GROUPS == MATRIX_SIZE
    for atom in ATOMS:
        assert {f"kill-at-{atom}-RUNNING", f"kill-at-{atom}-SUCCESS"} <= ids
    for method, _host in DRIVER_STEPS.values():
        assert {f"driver-kill-after-{method}", f"hang-{method}"} <= ids
    for atom in ROLLBACK_ATOMS:
        assert {f"rollback-kill-at-{atom}-REVERTING", f"rollback-kill-at-{atom}-REVERTED"} <= ids
