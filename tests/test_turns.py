"""Migration threads taking turns (``lifecycle.Turns``): one runs at a
time, a wait gives the turn away, and nothing that waits while holding it
can hold the others up for good (each test's threads are joined with a
timeout: a turn never given back fails the test instead of hanging it)."""
import multiprocessing
import threading
import time

import pytest

from migrateflow import api, drivers, hostops, lifecycle
from migrateflow.db import sqlite as db_sqlite
from migrateflow.drivers import base as driver_base
from migrateflow.tasks import base as task_base

from test_host_drain import TIME_SCALE, _assert_drained, _cloud, max_overlap

JOIN_S = 10


@pytest.fixture
def turns(monkeypatch):
    """Fresh turns for this test (the module's, as every caller finds them)."""
    fresh = lifecycle.Turns()
    monkeypatch.setattr(lifecycle, "TURNS", fresh)
    return fresh


def _run_all(targets):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads never ended (a turn never given back): {stuck}"


def test_one_thread_at_a_time_runs_among_those_taking_turns(turns):
    inside, peak, done = [0], [0], []
    guard = threading.Lock()

    def work(i):
        with turns.take():
            assert turns.holding()
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.01)  # a plain sleep keeps the turn
            with guard:
                inside[0] -= 1
            with turns.take():  # nested: still the same turn
                assert turns.holding()
            assert turns.holding()
        assert not turns.holding()
        done.append(i)

    _run_all([lambda i=i: work(i) for i in range(6)])
    assert sorted(done) == list(range(6))
    assert peak[0] == 1


def test_a_wait_gives_the_turn_to_another_thread(turns):
    released, order = threading.Event(), []

    def waiter():
        with turns.take():
            order.append("waiter in")
            with lifecycle.waiting():
                assert not turns.holding()
                assert released.wait(JOIN_S)
            assert turns.holding()
            order.append("waiter out")

    def releaser():
        while not order:
            time.sleep(0.001)
        with turns.take():  # only while the waiter waits
            order.append("releaser")
            released.set()

    _run_all([waiter, releaser])
    assert order == ["waiter in", "releaser", "waiter out"]


def test_sleeping_gives_the_turn_away(turns):
    ended = {}

    def sleeper():
        with turns.take():
            lifecycle.sleep(0.5)
        ended["sleeper"] = time.monotonic()

    def quick():
        time.sleep(0.05)  # the sleeper has the turn first
        with turns.take():
            ended["quick"] = time.monotonic()

    _run_all([sleeper, quick])
    assert ended["quick"] < ended["sleeper"]


def test_threads_not_taking_turns_are_not_held_up(turns):
    holding, free_ran = threading.Event(), threading.Event()

    def holder():  # keeps the turn until the other thread ran
        with turns.take():
            holding.set()
            assert free_ran.wait(JOIN_S)

    def free():
        assert holding.wait(JOIN_S)
        with lifecycle.waiting():  # not taking turns: nothing to give away
            assert not turns.holding()
        free_ran.set()

    _run_all([holder, free])
    assert free_ran.is_set()


class _Daemon(driver_base.ComputeDriver):
    """Stands in for a hypervisor daemon whose answer takes a while (a
    test double: the call blocks until the test lets it return).  Only the
    abstract methods' names are needed; none of them is called."""

    LOCAL_CALLS = False

    def __init__(self):
        self.answer = threading.Event()

    def slow_call(self):
        assert self.answer.wait(JOIN_S)
        return "answered"


for _name in driver_base.ComputeDriver.__abstractmethods__:
    setattr(_Daemon, _name, lambda self, *a, **k: None)
_Daemon.__abstractmethods__ = frozenset()


class _Step(task_base.MigrationTask):
    NAME = "test-step"

    def execute(self):
        return self.driver.slow_call()


def test_a_daemon_drivers_calls_give_the_turn_away(turns, monkeypatch):
    daemon = _Daemon()
    # the configured driver is replaced by the double (no daemon here that
    # answers only when told to)
    monkeypatch.setattr(drivers, "get_driver", lambda conf=None: daemon)
    results, calling = [], threading.Event()

    def migration():
        with turns.take():
            calling.set()
            results.append(_Step().execute())

    def other():
        assert calling.wait(JOIN_S)
        with turns.take():  # only while the first waits on the daemon
            results.append("other")
            daemon.answer.set()

    _run_all([migration, other])
    assert results == ["other", "answered"]
    # outside a turn, and for a driver of local calls, the driver itself
    assert _Step().driver is daemon
    monkeypatch.setattr(_Daemon, "LOCAL_CALLS", True)
    with turns.take():
        assert _Step().driver is daemon


def test_queueing_for_a_writer_lock_gives_the_turn_away(turns, tmp_path):
    """A thread that waits (turn given away) while it holds a file's writer
    lock gets its turn back from a thread queueing for that lock."""
    path = str(tmp_path / "state.sqlite")
    order, waiting = [], threading.Event()

    def holder():
        with turns.take():
            lock = db_sqlite.take_writer_lock(path)
            assert lock is not None
            with lifecycle.waiting():
                waiting.set()
                time.sleep(0.2)
            order.append("holder releases")
            lock.release()

    def queued():
        assert waiting.wait(JOIN_S)
        with turns.take():
            lock = db_sqlite.take_writer_lock(path)
            assert lock is not None
            order.append("queued writes")
            lock.release()

    _run_all([holder, queued])
    assert order == ["holder releases", "queued writes"]


def test_waiting_at_a_copy_gate_gives_the_turn_away(turns):
    gate = hostops.Gate([hostops._Limit(1)])
    assert gate.acquire(0)  # another copy holds the only place
    order, queued = [], threading.Event()

    def copy():
        with turns.take():
            queued.set()
            assert gate.acquire(JOIN_S)
            order.append("copy starts")
        gate.release()

    def other():
        assert queued.wait(JOIN_S)
        time.sleep(0.05)  # the copy waits at the gate by now
        with turns.take():  # only while the copy waits
            order.append("place given back")
            gate.release()

    _run_all([copy, other])
    assert order == ["place given back", "copy starts"]


def _child_takes_a_turn(code):
    with lifecycle.TURNS.take():
        code.value = 7


def test_a_forked_child_has_turns_of_its_own():
    code = multiprocessing.Value("i", 0)
    with lifecycle.TURNS.take():  # the parent's turn stays behind
        child = multiprocessing.get_context("fork").Process(
            target=_child_takes_a_turn, args=(code,))
        child.start()
        child.join(JOIN_S)
        alive = child.is_alive()
        if alive:
            child.kill()
            child.join()
    assert not alive and child.exitcode == 0 and code.value == 7


def test_drain_threads_taking_turns_still_overlap_their_copies(conf, db, driver):
    # two worker processes of four threads: threads of one process take
    # turns, and without the turn given away during the copy each process
    # would copy one at a time (a peak of 2, not 4)
    conf.set_override("time_scale", 3 * TIME_SCALE, group="fake_driver")
    instances = _cloud(db, driver, ["host-a"], 12)["host-a"]
    assert hostops._local_files(conf)
    report = hostops.drain_host(api.MigrationAPI(), "host-a", per_host_limit=4, processes=2)
    _assert_drained(db, driver, "host-a", instances, report)
    assert max_overlap(driver.timeline(), "host-a") == 4
