"""Urgent threads among those taking turns (``lifecycle.Turns``): the turn
goes to waiters in the order they asked, urgent ones (a migration holding a
copy gate) first, and a thread that is not urgent hands it to a waiting
urgent one between two steps of its flow, then gets it back first.  And a
drain worker process's garbage collector (``hostops._collect_less``)."""
import contextlib
import gc
import multiprocessing
import threading
import time

from migrateflow import api, hostops, lifecycle
from migrateflow.db import sqlite as db_sqlite
from migrateflow.tasks import live_migrate

from test_host_drain import _assert_drained, _cloud
from test_turns import JOIN_S, _run_all, turns  # noqa: F401 - the fixture

#: a thread that asked for the turn is queued by then (it blocks at once)
QUEUED_S = 0.05


def _queue(turns, name, order, urgent=False, then=None):  # noqa: F811
    """A thread body: ask for the turn (urgent or not), record ``name``."""
    def body():
        turns.set_urgent(urgent)
        with turns.take():
            order.append(name)
            if then is not None:
                then()
    return body


def _start(body):
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    time.sleep(QUEUED_S)
    return thread


def _join(threads):
    for thread in threads:
        thread.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a turn was never given back"


def test_the_turn_goes_in_the_order_asked_urgent_waiters_first(turns):  # noqa: F811
    order = []
    with turns.take():
        waiters = [_start(_queue(turns, "first", order)),
                   _start(_queue(turns, "second", order)),
                   _start(_queue(turns, "urgent", order, urgent=True)),
                   _start(_queue(turns, "third", order))]
        order.append("holder leaves")
    _join(waiters)
    assert order == ["holder leaves", "urgent", "first", "second", "third"]


def test_a_pause_hands_the_turn_to_an_urgent_waiter_and_gets_it_back_first(turns):  # noqa: F811
    order = []
    with turns.take():
        others = [_start(_queue(turns, "other", order))]
        turns.pause()  # only others wait: the turn is kept
        order.append("kept")
        others.append(_start(_queue(turns, "urgent", order, urgent=True)))
        turns.pause()
        assert turns.holding()
        order.append("back")
    _join(others)
    assert order == ["kept", "urgent", "back", "other"]


def test_an_urgent_thread_does_not_pause_for_another(turns):  # noqa: F811
    order = []
    turns.set_urgent(True)
    try:
        with turns.take():
            waiter = _start(_queue(turns, "urgent waiter", order, urgent=True))
            turns.pause()
            order.append("urgent holder")
    finally:
        turns.set_urgent(False)
    _join([waiter])
    assert order == ["urgent holder", "urgent waiter"]


def test_a_wait_first_back_gets_the_turn_before_every_waiter(turns):  # noqa: F811
    """A thread that got a database's write lock in its wait comes back
    before the urgent waiters and the others (they would wait for it)."""
    order, asked, done = [], threading.Event(), threading.Event()

    def writer():
        with turns.take():
            with turns.waiting(first_back=True):
                asked.set()
                assert done.wait(JOIN_S)
            order.append("writer back")

    first = _start(writer)
    assert asked.wait(JOIN_S)  # it took the turn and gave it away
    with turns.take():
        waiters = [_start(_queue(turns, "other", order)),
                   _start(_queue(turns, "urgent", order, urgent=True))]
        done.set()
        time.sleep(QUEUED_S)  # the writer queued again, after the others
        order.append("holder leaves")
    _join([first, *waiters])
    assert order == ["holder leaves", "writer back", "urgent", "other"]


def test_a_writer_lock_got_after_a_wait_is_used_before_the_others_run(
        turns, tmp_path):  # noqa: F811
    """A thread queueing for its process's writer lock (held by a thread
    that does not take turns, like the step mirror's) runs first once it
    got it, so the threads taking turns meanwhile do not queue behind it
    one after the other."""
    path = str(tmp_path / "state.sqlite")
    order, held, release = [], threading.Event(), threading.Event()

    def outsider():  # takes no turns
        lock = db_sqlite.take_writer_lock(path)
        held.set()
        assert release.wait(JOIN_S)
        lock.release()

    def queued_writer():
        with turns.take():
            lock = db_sqlite.take_writer_lock(path)
            order.append("queued writer writes")
            lock.release()

    def other():
        with turns.take():
            order.append("other runs")

    holder = _start(outsider)
    assert held.wait(JOIN_S)
    writer = _start(queued_writer)  # took the turn, then gave it away to queue
    with turns.take():
        others = [_start(other), _start(other)]
        release.set()
        time.sleep(QUEUED_S)  # the writer got the lock and queued for the turn
    _join([holder, writer, *others])
    assert order == ["queued writer writes", "other runs", "other runs"]


def test_a_flow_lets_an_urgent_thread_run_between_its_steps(turns, small_cloud):  # noqa: F811
    """A live migration run by a thread taking turns: an urgent thread
    asking for the turn runs at the flow's next step, not after its end."""
    events, urgent_ran = [], []
    started = threading.Event()

    @contextlib.contextmanager
    def listener(engine):
        def record(state, details):
            events.append((details.get("task_name") or details.get("retry_name"), state))
            if not started.is_set():
                started.set()
                # hold this step until the urgent thread is queued
                deadline = time.monotonic() + JOIN_S
                while not turns._urgent and time.monotonic() < deadline:
                    time.sleep(0.001)
        engine.atom_notifier.register("*", record)
        try:
            yield
        finally:
            engine.atom_notifier.deregister("*", record)

    migration = {}

    def migrate():
        with turns.take():
            migration.update(api.MigrationAPI(listeners=[listener]).live_migrate(
                small_cloud["instance"]["uuid"], "host-b"))

    def urgent():
        assert started.wait(JOIN_S)
        turns.set_urgent(True)
        with turns.take():
            urgent_ran.append(len(events))

    _run_all([migrate, urgent])
    assert migration["status"] == "completed"
    steps = len(events)
    assert urgent_ran and urgent_ran[0] < steps // 2, (urgent_ran, steps)


class _RecordingGate:
    """A copy gate with room to spare that records whether its thread was
    urgent when it came back with a place and when it gave the place back."""

    def __init__(self, fail=False):
        self.seen, self._fail = [], fail

    def acquire(self, timeout=None):
        self.seen.append(("acquire", lifecycle.TURNS.is_urgent()))
        if self._fail:
            raise lifecycle.Detach()  # as a stopping process ends the wait
        return True

    def release(self):
        self.seen.append(("release", lifecycle.TURNS.is_urgent()))


def test_a_migration_is_urgent_while_it_holds_its_copy_gate(small_cloud, driver):
    inst = small_cloud["instance"]
    gate = _RecordingGate()
    live_migrate.register_copy_gate(inst["uuid"], gate)
    try:
        with lifecycle.TURNS.take():
            mig = api.MigrationAPI().live_migrate(inst["uuid"], "host-b")
            assert not lifecycle.TURNS.is_urgent()
    finally:
        live_migrate.unregister_copy_gate(inst["uuid"])
    assert mig["status"] == "completed"
    assert driver.get_guest("host-b", inst["uuid"])["state"] == "running"
    assert gate.seen == [("acquire", True), ("release", True)]


def test_a_migration_whose_gate_wait_ends_is_no_longer_urgent():
    held = live_migrate._Held(_RecordingGate(fail=True))
    try:
        held.take(lambda gate: gate.acquire())
    except lifecycle.Detach:
        pass
    assert not lifecycle.TURNS.is_urgent()
    held.release()  # nothing held: nothing given back
    assert not lifecycle.TURNS.is_urgent()


def _report_gc(found):
    hostops._worker(None, None, False, 1, _Empty(), None)  # no instance to move
    found.put((gc.get_freeze_count(), gc.get_threshold()[0]))


class _Empty:
    @staticmethod
    def get():
        return None


def test_a_drain_worker_process_collects_less_and_the_controller_as_before(
        conf, db, driver):
    # in a worker process (forked as a drain forks them): the objects it
    # started with are left to it, young ones looked at less often
    found = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_report_gc, args=(found,))
    child.start()
    frozen, threshold = found.get(timeout=JOIN_S)
    child.join(JOIN_S)
    assert child.exitcode == 0
    assert frozen > 1000 and threshold == hostops.WORKER_GC_THRESHOLD
    # workers that are threads of the controller leave its collector alone
    before = (gc.get_freeze_count(), gc.get_threshold())
    instances = _cloud(db, driver, ["host-a"], 2)["host-a"]
    report = hostops.drain_host(api.MigrationAPI(), "host-a", processes=1)
    _assert_drained(db, driver, "host-a", instances, report)
    assert (gc.get_freeze_count(), gc.get_threshold()) == before
