"""What the crash matrices share: a case's world (the conductors forked
from the zygote, their journal, the configuration they read) and the reads
the assertions make (persisted atom states, jobs on the board, host usage).
Test code, not product code."""
import collections
import contextlib
import dataclasses
import signal
import sqlite3
import time

import pytest
from taskflow import states as st

from conductor_procs import Zygote
from helpers import conductor_config
from migrateflow import api as api_mod
from migrateflow import engine
from migrateflow.conf import CONF

SESSION_TIMEOUT = 1.0  # conductors' ZooKeeper session: a dead one's claim lasts this long
CONDUCTOR_POLL = 0.1  # conductors look for claimable jobs this often (TaskFlow: 0.5 s)
#: futurist's worker threads wait this long for work before they notice a
#: shutdown (futurist: 1 s; a conductor's stop and a board's close each wait
#: for it once): a polling period, lowered so a case does not wait 2 s for B
WORKER_IDLE = 0.05
FINISH_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """The fork server of the module's conductors (tests/conductor_procs.py)."""
    zyg = Zygote(str(tmp_path_factory.mktemp("conductors")))
    yield zyg
    zyg.close()


class Env:
    def __init__(self, tmp_path, zk_hosts, db, driver, zygote, instance):
        self.tmp, self.db, self.driver, self.zygote = tmp_path, db, driver, zygote
        self.uuid = instance["uuid"]
        self.api = api_mod.MigrationAPI()
        self.journal = str(tmp_path / "journal")
        self.events = None  # a file: the conductors append their notifications
        self.config = str(tmp_path / "migrateflow.conf")
        self.conductors = []
        conductor_config(CONF, tmp_path / "migrateflow.conf", hosts=zk_hosts,
                         session_timeout=SESSION_TIMEOUT)

    def start(self, label, kill_at=None, kill_on_job_status=None):
        argv = ["--config-file", self.config, "--journal", self.journal, "--label", label,
                "--wait-timeout", str(CONDUCTOR_POLL), "--worker-idle", str(WORKER_IDLE)]
        if kill_at:
            argv += ["--kill-at", kill_at]
        if kill_on_job_status:
            argv += ["--kill-on-job-status", kill_on_job_status]
        if self.events:
            argv += ["--events", self.events]
        cond = self.zygote.spawn(label, argv, str(self.tmp / f"conductor-{label}.log"))
        self.conductors.append(cond)
        return cond

    def logs(self):
        return "\n".join(f"--- conductor {c.label} (pid {c.pid}, exit {c.poll()}) "
                         f"{c.log}:\n{c.log_tail()}" for c in self.conductors)

    def fault_remaining(self, fault_id):
        with contextlib.closing(sqlite3.connect(self.driver.state_file, timeout=30)) as conn:
            row = conn.execute("SELECT remaining FROM faults WHERE id = ?",
                               (fault_id,)).fetchone()
        return row[0]

    def stop_all(self):
        for cond in self.conductors:
            with contextlib.suppress(ProcessLookupError):
                cond.signal(signal.SIGKILL)
            cond.wait(10)


def wait_until(predicate, timeout, what, env, interval=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{env.logs()}")
        time.sleep(interval)


def persisted_state(flow_uuid, name):
    with contextlib.closing(engine.get_backend().get_connection()) as conn:
        detail = conn.get_flow_details(flow_uuid)
    if name == "flow":
        return detail.state
    return {ad.name: ad.state for ad in detail}[name]


def board_jobs():
    return list(engine.get_board().iterjobs(ensure_fresh=True))


def usage(db):
    return {h["name"]: (h["memory_used_mb"], h["vcpus_used"], h["disk_used_gb"])
            for h in db.list_hosts()}


def journal(path):
    events = []
    with open(path) as f:
        for line in f:
            label, kind, name, state = line.split()
            events.append((label, kind, name, state))
    return events


@dataclasses.dataclass(frozen=True)
class Case:
    """One case of the resize and evacuation matrices (see run_case)."""
    id: str
    scenario: str
    kill_at: str = None  # "ATOM:STATE" (or "flow:STATE") where A kills itself
    faults: tuple = ()  # (method, action, when, host, count) armed before posting
    hang: str = None  # the method whose hang fault is awaited, then A is SIGKILLed
    interrupted: str = None  # "ATOM:STATE" persisted when A died inside a step


def run_case(env, case, post, expected_status):
    """One case of a crash matrix: conductor A starts (told to die at
    ``case.kill_at``), ``post(fault_ids)`` arms the faults and posts the
    job (returns the migration id), A dies (by itself, or SIGKILLed once
    ``case.hang``'s call hangs), the persisted state is checked against
    ``case.kill_at`` / ``case.interrupted``, conductor B finishes the job.
    Returns the final migration record (its status ``expected_status``)."""
    db, driver = env.db, env.driver
    a = env.start("A", kill_at=case.kill_at)
    fault_ids = {}
    mig_id = post(fault_ids)
    if case.hang:
        wait_until(lambda: env.fault_remaining(fault_ids[case.hang]) == 0
                   or a.poll() is not None, 30, f"{case.hang} to hang", env)
        assert a.poll() is None, f"A died before hanging in {case.hang}\n{env.logs()}"
        a.signal(signal.SIGKILL)
    status = a.wait(30)
    assert status == -signal.SIGKILL, f"conductor A exit status {status}\n{env.logs()}"
    driver.release_hangs()
    driver.clear_faults()
    flow_uuid = db.get_migration(mig_id)["flow_uuid"]
    for point in (case.kill_at, case.interrupted):
        if point:
            name, _, state = point.rpartition(":")
            assert persisted_state(flow_uuid, name) == state, f"{point}\n{env.logs()}"
    b = env.start("B")
    final = env.api.wait(mig_id, timeout=FINISH_TIMEOUT)
    assert final["status"] == expected_status, (
        f"migration {final['status']} (step {final['current_step']}): {final['error']}\n"
        f"{env.logs()}")
    wait_until(lambda: not board_jobs(), 15, "conductor B to consume the job", env, 0.05)
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0, f"conductor B did not stop on SIGTERM\n{env.logs()}"
    return final


def arm(env, faults, fault_ids):
    """Inject ``faults`` ((method, action, when, host, count)) for the
    case's instance; remember their ids by method."""
    for method, action, when, host, count in faults:
        fault_ids[method] = env.driver.inject_fault(method, action, host=host,
                                                    instance=env.uuid, count=count, when=when)


def assert_no_step_twice(env, succeeded_expected, reverted_expected):
    """From both conductors' journal: B never ran or reverted again what A
    had finished, and exactly the expected atoms succeeded (were reverted),
    each once.  (Exactly-once is counted on SUCCESS and REVERTED: the step
    B runs again after a kill in its middle emits no RUNNING in B.)"""
    by = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for label, kind, name, state in journal(env.journal):
        if kind != "flow":
            by[label][state][name] += 1
    a, b = by["A"], by["B"]
    done_by_a = set(a[st.SUCCESS])
    assert not done_by_a & (set(b[st.RUNNING]) | set(b[st.SUCCESS])), \
        f"steps finished by A run again by B: {sorted(done_by_a & set(b[st.SUCCESS]))}"
    assert not set(a[st.REVERTED]) & set(b[st.REVERTING]), "a finished revert ran again"
    succeeded = a[st.SUCCESS] + b[st.SUCCESS]
    reverted = a[st.REVERTED] + b[st.REVERTED]
    assert not [n for n, k in succeeded.items() if k > 1], f"succeeded twice: {succeeded}"
    assert not [n for n, k in reverted.items() if k > 1], f"reverted twice: {reverted}"
    assert set(succeeded) == set(succeeded_expected), f"succeeded: {sorted(succeeded)}"
    assert set(reverted) == set(reverted_expected), f"reverted: {sorted(reverted)}"
