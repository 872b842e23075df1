"""What the engine's cheap paths must keep: the persisted state of a run,
the number of writes it costs, the reuse of a flow within one thread, and
the writers' queue of a SQLite file."""
import contextlib
import multiprocessing
import os
import random
import signal
import threading

import pytest
import sqlalchemy as sa
import taskflow.engines
from taskflow import states as tf_states
from taskflow import task
from taskflow.engines.action_engine import compiler as tf_compiler
from taskflow.engines.action_engine import selector as tf_selector
from taskflow.patterns import graph_flow, linear_flow
from taskflow.persistence import models as tf_models

from migrateflow import api, engine, persistence, serial_engine, serial_runtime
from migrateflow.db import sqlite as db_sqlite
from migrateflow.flows import confirm_resize, evacuation, live_migration, resize, revert_resize


def _flow_detail(db, mig):
    with contextlib.closing(engine.get_backend().get_connection()) as conn:
        return conn.get_flow_details(db.get_migration(mig["uuid"])["flow_uuid"])


def test_run_persists_every_atom_with_its_state_and_progress(conf, db, small_cloud):
    mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    assert mig["status"] == "completed", mig["error"]
    detail = _flow_detail(db, mig)
    assert detail.state == tf_states.SUCCESS
    assert detail.meta["factory"] == {"name": "migrateflow.flows.live_migration.build",
                                      "args": [], "kwargs": {}}
    names = {ad.name: ad for ad in detail}
    injector = names.pop("_TaskFlow_INJECTOR")
    assert injector.state == tf_states.SUCCESS
    assert injector.results["migration_id"] == mig["uuid"]
    assert names, "no atom persisted"
    for ad in names.values():
        assert ad.state == tf_states.SUCCESS, ad.name
        if isinstance(ad, tf_models.TaskDetail):
            assert ad.meta.get("progress") == 1.0, ad.name


def test_two_atom_writes_per_task(conf, db, small_cloud, monkeypatch):
    """Running, then done: the engine's progress marks ride on those writes."""
    if conf.persistence.backend != "sql":
        pytest.skip("counts the SQL backend's writes")
    from migrateflow import persistence
    writes = []
    real = persistence.Connection.update_atom_details
    monkeypatch.setattr(persistence.Connection, "update_atom_details",
                        lambda self, ad: writes.append(ad.name) or real(self, ad))
    mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    assert mig["status"] == "completed", mig["error"]
    atoms = [ad.name for ad in _flow_detail(db, mig) if not ad.name.startswith("_TaskFlow_")]
    assert sorted(writes) == sorted(atoms * 2)


def test_flow_reused_by_a_thread_unless_running_or_reset():
    flow, compilation, key = serial_engine.compiled_flow(live_migration.build, ())
    again = serial_engine.compiled_flow(live_migration.build, ())
    assert again == (flow, compilation, key)
    serial_engine._compiled.in_use.add(key)
    try:
        other, _, other_key = serial_engine.compiled_flow(live_migration.build, ())
        assert other is not flow and other_key is None
    finally:
        serial_engine._compiled.in_use.discard(key)
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(
        serial_engine.compiled_flow(live_migration.build, ())[0]))
    thread.start()
    thread.join()
    assert elsewhere[0] is not flow
    engine.reset()  # tests patch task classes between runs: built anew
    assert serial_engine.compiled_flow(live_migration.build, ())[0] is not flow


def test_writer_queue_released_after_commit_rollback_and_error(tmp_path):
    url = f"sqlite:///{tmp_path}/q.sqlite"
    eng = db_sqlite.tune_sqlite_engine(sa.create_engine(url), "NORMAL")
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x)")
    lock = db_sqlite._writer_lock(str(tmp_path / "q.sqlite"))
    assert not lock.locked()
    with pytest.raises(ZeroDivisionError):
        with eng.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            assert lock.locked()
            raise ZeroDivisionError
    assert not lock.locked()
    with pytest.raises(sa.exc.OperationalError):
        with eng.begin() as conn:
            conn.exec_driver_sql("INSERT INTO missing VALUES (1)")
    assert not lock.locked()
    with eng.connect() as conn:  # ended by closing (rolled back by the pool)
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        assert lock.locked()
    assert not lock.locked()
    assert db_sqlite.execute_raw(eng, "INSERT INTO t VALUES (3)", write=True) == 1
    assert not lock.locked()
    with eng.connect() as conn:
        assert sorted(conn.exec_driver_sql("SELECT x FROM t").scalars()) == [3]
    eng.dispose()


def _hold_writer_lock(path, ready, release, then):
    """In a forked child: hold ``path``'s writer lock until ``release`` is
    set (or, with ``then`` "die", die holding it)."""
    held = db_sqlite.take_writer_lock(path)
    ready.set()
    release.wait(30)
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    held.release()
    os._exit(0)


@pytest.mark.parametrize("then", ["release", "die"])
def test_writer_queue_spans_processes(tmp_path, then):
    """Another process's writer waits for the lock, and gets it as soon as
    its holder lets go, or dies holding it (no sleeping busy wait)."""
    path = str(tmp_path / "x.sqlite")
    fork = multiprocessing.get_context("fork")
    ready, release = fork.Event(), fork.Event()
    child = fork.Process(target=_hold_writer_lock, args=(path, ready, release, then))
    child.start()
    assert ready.wait(30)
    got = []
    taker = threading.Thread(target=lambda: got.append(db_sqlite.take_writer_lock(path)))
    taker.start()
    taker.join(0.3)
    assert taker.is_alive() and not got  # queued behind the other process
    release.set()
    taker.join(5)
    assert got and got[0] is not None
    got[0].release()
    child.join(10)
    assert child.exitcode == (-signal.SIGKILL if then == "die" else 0)


def _open_new_file_at_once(url, barrier):
    try:
        barrier.wait(30)
        eng = db_sqlite.tune_sqlite_engine(sa.create_engine(url), "NORMAL")
        persistence.create_schema(eng)
        with eng.begin() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM tf_logbooks").scalar()
        eng.dispose()
    except BaseException:  # noqa: BLE001 - the exit code tells the parent
        import traceback
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_processes_opening_a_new_file_at_once_all_get_it(tmp_path):
    """Switching a new file to WAL needs it alone: SQLite says "locked" at
    once (no busy wait) to the others opening it then, who wait and retry."""
    fork = multiprocessing.get_context("fork")
    for round_ in range(4):
        url = f"sqlite:///{tmp_path}/new-{round_}.sqlite"
        barrier = fork.Barrier(6)
        children = [fork.Process(target=_open_new_file_at_once, args=(url, barrier))
                    for _ in range(6)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        assert [c.exitcode for c in children] == [0] * 6
        eng = db_sqlite.tune_sqlite_engine(sa.create_engine(url), "NORMAL")
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        eng.dispose()


def test_a_writer_holding_one_file_does_not_queue_for_another(tmp_path):
    first = db_sqlite.take_writer_lock(str(tmp_path / "a.sqlite"))
    try:
        assert first is not None
        assert db_sqlite.take_writer_lock(str(tmp_path / "b.sqlite")) is None
        other = []
        thread = threading.Thread(target=lambda: other.append(
            db_sqlite.take_writer_lock(str(tmp_path / "b.sqlite"))))
        thread.start()
        thread.join(5)
        assert other[0] is not None  # another thread queues as usual
        other[0].release()
    finally:
        first.release()
    again = db_sqlite.take_writer_lock(str(tmp_path / "b.sqlite"))
    assert again is not None
    again.release()


class _Noop(task.Task):
    def execute(self):
        return None


def _graph_flow():
    """Branches that join, a nested linear flow and an independent atom."""
    flow = graph_flow.Flow("g")
    a, b, c, d, e = (_Noop(name=n) for n in "abcde")
    inner = linear_flow.Flow("inner").add(_Noop(name="i1"), _Noop(name="i2"))
    flow.add(a, b, c, d, e, inner)
    flow.link(a, b)
    flow.link(a, c)
    flow.link(b, d)
    flow.link(c, d)
    flow.link(d, inner)
    return flow


_STATES = (tf_states.PENDING, tf_states.RUNNING, tf_states.SUCCESS, tf_states.FAILURE,
           tf_states.REVERTED, tf_states.IGNORE)
_INTENTIONS = (tf_states.EXECUTE, tf_states.IGNORE, tf_states.REVERT, tf_states.RETRY)


@pytest.mark.parametrize("factory", [live_migration.build, resize.build, evacuation.build,
                                     confirm_resize.build, revert_resize.build, _graph_flow],
                         ids=lambda f: f.__module__.rsplit(".", 1)[-1] + "." + f.__name__)
def test_selector_finds_what_taskflows_full_walk_finds(factory):
    """From every atom, over runs in order and random states: the same
    atoms, in the same order, with the same deciders' kinds."""
    eng = taskflow.engines.load(factory(), store={}, engine="serial")
    eng.compile()
    runtime, storage = eng._runtime, eng.storage
    ours, stock = serial_runtime.Selector(runtime), tf_selector.Selector(runtime)
    atoms = list(runtime.iterate_nodes(tf_compiler.ATOMS))
    storage.ensure_atoms(atoms)

    def compare():
        for atom in atoms:
            want = [(a.name, type(d)) for a, d in stock._browse_atoms_for_execute(atom)]
            got = [(a.name, type(d)) for a, d in ours._browse_atoms_for_execute(atom)]
            assert got == want, (atom.name, storage.get_atoms_states(a.name for a in atoms))

    found = 0
    for done in range(len(atoms) + 1):  # a run in the compiled order
        for i, atom in enumerate(atoms):
            storage.set_atom_state(atom.name, tf_states.SUCCESS if i < done
                                   else tf_states.PENDING)
            storage.set_atom_intention(atom.name, tf_states.EXECUTE)
        compare()
        found += sum(1 for a in atoms for _ in ours._browse_atoms_for_execute(a))
    assert found >= len(atoms) - 1  # each next step was found from the one before
    rand = random.Random(7)
    for _ in range(150):
        for atom in atoms:
            storage.set_atom_state(atom.name, rand.choice(_STATES[:3] * 3 + _STATES))
            storage.set_atom_intention(atom.name, rand.choice(_INTENTIONS[:1] * 6 + _INTENTIONS))
        compare()
