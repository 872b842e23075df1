"""``db.sqlite.execute_raw``: a file database's hot statements run on the
calling thread's own sqlite3 connection, set up as the engine's pool sets
its connections up, renewed when that changes, and made anew in a forked
child; other databases' go through the pool.  ``raw_transaction``: several
statements at once there, all or nothing, the writer lock given back."""
import multiprocessing
import sqlite3
import threading

import pytest
import sqlalchemy as sa

from migrateflow.db import sqlite as db_sqlite

#: PRAGMA synchronous answers
_NORMAL, _FULL = 1, 2


def _engine(tmp_path, synchronous="NORMAL"):
    eng = db_sqlite.tune_sqlite_engine(
        sa.create_engine(f"sqlite:///{tmp_path / 'raw.sqlite'}"), synchronous)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    return eng


def _own(eng):
    return db_sqlite._own_connection(eng, db_sqlite._file_of(eng))


def test_a_thread_runs_on_its_own_connection_set_up_like_the_pools(tmp_path):
    eng = _engine(tmp_path)
    assert db_sqlite.execute_raw(eng, "INSERT INTO t VALUES (?)", (1,), write=True) == 1
    mine = _own(eng)
    assert _own(eng) is mine
    assert mine.execute("PRAGMA synchronous").fetchone()[0] == _NORMAL
    assert mine.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert mine.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert mine.in_transaction is False  # autocommit: each statement its own
    other = []
    thread = threading.Thread(target=lambda: other.append(
        (_own(eng), db_sqlite.execute_raw(eng, "SELECT x FROM t"))))
    thread.start()
    thread.join()
    assert other[0][0] is not mine and other[0][1] == [(1,)]
    # seen by the pool's connections: committed
    with eng.connect() as conn:
        assert conn.exec_driver_sql("SELECT x FROM t").scalars().all() == [1]
    eng.dispose()


def test_a_changed_synchronous_setting_renews_the_connection(tmp_path):
    eng = _engine(tmp_path)
    before = _own(eng)
    db_sqlite.tune_sqlite_engine(eng, "FULL")
    after = _own(eng)
    assert after is not before
    assert after.execute("PRAGMA synchronous").fetchone()[0] == _FULL
    eng.dispose()


def test_a_write_queues_as_the_pools_writes_do(tmp_path):
    eng = _engine(tmp_path)
    lock = db_sqlite._writer_lock(db_sqlite._file_of(eng))
    assert lock.acquire()  # another writer of this process holds the file
    done = []
    thread = threading.Thread(target=lambda: done.append(
        db_sqlite.execute_raw(eng, "INSERT INTO t VALUES (2)", write=True)))
    thread.start()
    thread.join(0.2)
    assert thread.is_alive() and not done  # queued behind it
    lock.release()
    thread.join(5)
    assert done == [1] and not lock.locked()
    eng.dispose()


def test_a_forked_child_makes_its_own_and_leaves_the_parents(tmp_path):
    eng = _engine(tmp_path)
    parents = _own(eng)
    result = multiprocessing.Value("i", 0)
    child = multiprocessing.get_context("fork").Process(
        target=lambda: setattr(result, "value", db_sqlite.execute_raw(
            eng, "INSERT INTO t VALUES (3)", write=True) + 10 * (_own(eng) is not parents)))
    child.start()
    child.join(10)
    assert child.exitcode == 0 and result.value == 11
    # the parent's connection was not touched by the child
    assert _own(eng) is parents
    assert db_sqlite.execute_raw(eng, "SELECT x FROM t") == [(3,)]
    eng.dispose()


def test_in_memory_and_untuned_databases_go_through_the_pool(tmp_path):
    memory = db_sqlite.tune_sqlite_engine(
        sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool))
    with memory.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    assert db_sqlite.execute_raw(memory, "INSERT INTO t VALUES (4)", write=True) == 1
    assert db_sqlite.execute_raw(memory, "SELECT x FROM t") == [(4,)]  # the same database
    untuned = _engine(tmp_path, synchronous=None)
    assert db_sqlite.execute_raw(untuned, "INSERT INTO t VALUES (5)", write=True) == 1
    assert not getattr(db_sqlite._own, "conns", {}).get(untuned)
    assert db_sqlite.execute_raw(untuned, "SELECT x FROM t") == [(5,)]
    memory.dispose()
    untuned.dispose()


def test_a_raw_transaction_commits_all_or_nothing_and_lets_the_next_writer_in(tmp_path):
    eng = _engine(tmp_path)
    assert db_sqlite.raw_capable(eng)
    with db_sqlite.raw_transaction(eng) as db:
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (2)")
        other = sqlite3.connect(db_sqlite._file_of(eng))  # not committed yet: it sees none
        assert other.execute("SELECT count(*) FROM t").fetchone() == (0,)
        other.close()
    try:
        with db_sqlite.raw_transaction(eng) as db:
            db.execute("INSERT INTO t VALUES (3)")
            raise KeyError("the body failed")
    except KeyError:
        pass
    assert not _own(eng).in_transaction
    writer = db_sqlite._writer_lock(db_sqlite._file_of(eng))
    assert not writer.locked()  # given back after the commit and after the rollback
    with eng.connect() as conn:
        assert conn.exec_driver_sql("SELECT x FROM t ORDER BY x").scalars().all() == [1, 2]
    eng.dispose()


def test_only_a_tuned_file_database_is_raw_capable(tmp_path):
    assert not db_sqlite.raw_capable(db_sqlite.tune_sqlite_engine(sa.create_engine("sqlite://")))
    assert not db_sqlite.raw_capable(sa.create_engine(f"sqlite:///{tmp_path / 'plain.sqlite'}"))
    assert not db_sqlite.raw_capable(_engine(tmp_path, synchronous=None))


def test_a_new_logbook_and_flow_rows_are_written_straight_on_sqlite(tmp_path, monkeypatch):
    """Every new flow's logbook (one transaction: book, flows, atoms) and
    its flow-state changes run raw on a SQLite file; a book stored already
    is merged through SQLAlchemy; what either writes reads back the same."""
    from taskflow import exceptions as tf_exc
    from taskflow import states
    from taskflow.persistence import models

    from migrateflow import persistence

    backend = persistence.SQLBackend.from_url(f"sqlite:///{tmp_path / 'flows.sqlite'}")
    conn = backend.get_connection()
    conn.upgrade()
    raw = []
    real = db_sqlite.raw_transaction
    monkeypatch.setattr(db_sqlite, "raw_transaction", lambda e: raw.append(1) or real(e))
    book = models.LogBook("book")
    flow = models.FlowDetail("flow", uuid="f-1")
    flow.add(models.TaskDetail("task", uuid="t-1"))
    flow.add(models.RetryDetail("retry", uuid="r-1"))
    book.add(flow)
    assert conn.save_logbook(book) is book and raw == [1]
    flow.state = states.RUNNING
    conn.update_flow_row(flow)
    got = conn.get_logbook(book.uuid)
    assert got.find("f-1").state == states.RUNNING
    assert {ad.uuid: type(ad) for ad in got.find("f-1")} == {
        "t-1": models.TaskDetail, "r-1": models.RetryDetail}
    with pytest.raises(tf_exc.NotFound):
        conn.update_flow_row(models.FlowDetail("other", uuid="f-2"))
    book.add(models.FlowDetail("second", uuid="f-3"))
    conn.save_logbook(book)  # stored already: merged by SQLAlchemy
    assert raw == [1, 1]
    assert {fd.uuid for fd in conn.get_logbook(book.uuid)} == {"f-1", "f-3"}
    with backend.engine.connect() as sa_conn:  # SQLAlchemy reads the raw rows' times
        times = sa_conn.execute(sa.select(persistence.FLOWDETAILS.c.updated_at)).scalars().all()
    assert len(times) == 2 and all(t.year >= 2026 for t in times)
    backend.close()
