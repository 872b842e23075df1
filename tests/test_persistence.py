"""migrateflow.persistence against real databases (SQLite file; PostgreSQL and
MariaDB when their servers answer), driven directly and by TaskFlow engines."""
import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import uuid

import pytest
import sqlalchemy as sa
import taskflow.engines
from oslo_db.sqlalchemy import engines as oslo_engines
from taskflow import exceptions as exc
from taskflow import states
from taskflow.patterns import unordered_flow as uf
from taskflow.persistence import models
from taskflow.types import failure as ft

import logged_flow
from migrateflow import persistence as P

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1/test"
MY_ADMIN = "mysql+pymysql://root@127.0.0.1/test"


@contextlib.contextmanager
def _server_database(admin_url, kind):
    """A fresh database on a local server; skip when the server is down."""
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        pytest.skip("%s server not reachable at %s: %s" % (kind, admin_url, e))
    name = "mf_persist_" + uuid.uuid4().hex[:12]
    extra = " CHARACTER SET utf8mb4" if kind == "mysql" else ""
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + name + extra)
    try:
        yield sa.engine.make_url(admin_url).set(database=name)
    finally:
        drop = " WITH (FORCE)" if kind == "postgresql" else ""
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE " + name + drop)
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url():
    with _server_database(PG_ADMIN, "postgresql") as url:
        yield url


@pytest.fixture(scope="session")
def mysql_url():
    with _server_database(MY_ADMIN, "mysql") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite:///%s" % (tmp_path / "flows.db")
    url = request.getfixturevalue(
        "pg_url" if request.param == "postgresql" else "mysql_url")
    be = P.SQLBackend.from_url(url)  # server databases are session-wide
    P.create_schema(be.engine)
    be.get_connection().clear_all()
    be.close()
    return url


@pytest.fixture
def backend(db_url):
    be = P.SQLBackend.from_url(db_url)
    with contextlib.closing(be.get_connection()) as conn:
        conn.upgrade()
    yield be
    be.close()


def _failure(message):
    try:
        raise RuntimeError(message, 42)
    except RuntimeError:
        return ft.Failure()


def _sample_book():
    book = models.LogBook("book-1")
    book.meta = {"owner": "tests", "n": [1, 2, 3]}
    fd = models.FlowDetail("flow-1", uuid=str(uuid.uuid4()))
    fd.state, fd.meta = states.RUNNING, {"factory": {"name": "x"}}
    td = models.TaskDetail("task-1", uuid=str(uuid.uuid4()))
    td.state, td.intention, td.version = states.FAILURE, states.REVERT, "1.2"
    td.results = {"disk": [1, 2.5, None, True], "name": "vm-\u00e9"}
    td.failure = _failure("boom")
    td.revert_results = ["undone", 7]
    td.revert_failure = _failure("revert boom")
    td.meta = {"progress": 0.5}
    rd = models.RetryDetail("retry-1", uuid=str(uuid.uuid4()))
    rd.state = states.RETRYING
    rd.results = [(1, {}), ({"try": 2}, {"task-1": _failure("again")})]
    fd.add(td)
    fd.add(rd)
    book.add(fd)
    book.add(models.FlowDetail("flow-2", uuid=str(uuid.uuid4())))
    return book


def _atoms(fd):
    return {ad.uuid: (type(ad), ad.to_dict()) for ad in fd}


def _assert_book_equal(got, want, lazy=False):
    assert got.to_dict() == want.to_dict()
    if lazy:
        assert len(got) == 0
        return
    assert {fd.uuid for fd in got} == {fd.uuid for fd in want}
    for fd in want:
        assert got.find(fd.uuid).to_dict() == fd.to_dict()
        assert _atoms(got.find(fd.uuid)) == _atoms(fd)


def test_round_trip(backend):
    book = _sample_book()
    conn = backend.get_connection()
    conn.save_logbook(book)
    other = P.SQLBackend.from_url(backend.engine.url).get_connection()
    _assert_book_equal(other.get_logbook(book.uuid), book)
    _assert_book_equal(other.get_logbook(book.uuid, lazy=True), book, True)
    [listed] = other.get_logbooks()
    _assert_book_equal(listed, book)
    _assert_book_equal(list(other.get_logbooks(lazy=True))[0], book, True)
    fd = next(f for f in book if len(f))
    flows = {f.uuid: f for f in other.get_flows_for_book(book.uuid)}
    assert _atoms(flows[fd.uuid]) == _atoms(fd)
    lazy_flows = other.get_flows_for_book(book.uuid, lazy=True)
    assert sorted(len(f) for f in lazy_flows) == [0, 0]
    assert _atoms(other.get_flow_details(fd.uuid)) == _atoms(fd)
    assert len(other.get_flow_details(fd.uuid, lazy=True)) == 0
    assert other.get_flow_details(fd.uuid).to_dict() == fd.to_dict()
    assert {a.uuid for a in other.get_atoms_for_flow(fd.uuid)} == {
        a.uuid for a in fd}
    td = next(a for a in fd if isinstance(a, models.TaskDetail))
    got = other.get_atom_details(td.uuid)
    assert got.to_dict() == td.to_dict()
    assert got.failure.matches(td.failure) and got.revert_failure.matches(
        td.revert_failure)
    assert got.failure.exception_args == ("boom", 42)
    rd = other.get_atom_details(next(a.uuid for a in fd if a is not td))
    assert isinstance(rd, models.RetryDetail)
    assert rd.results[1][1]["task-1"].exception_str == "('again', 42)"
    assert other.get_logbook(book.uuid).created_at == book.created_at
    other.backend.close()


def test_merge_semantics(backend):
    book = _sample_book()
    conn = backend.get_connection()
    conn.save_logbook(book)
    fd = next(f for f in book if len(f))
    td = next(a for a in fd if isinstance(a, models.TaskDetail))
    rd = next(a for a in fd if isinstance(a, models.RetryDetail))

    # update_atom_details replaces every field (TaskFlow's merge does)
    td2 = td.copy()
    td2.reset(states.SUCCESS)
    td2.results, td2.meta = {"ok": 1}, {}
    returned = conn.update_atom_details(td2)
    assert returned.to_dict() == td2.to_dict()
    assert conn.get_atom_details(td.uuid).to_dict() == td2.to_dict()
    conn.update_atom_details(td2)  # identical row: still found (MySQL rowcount)

    # update_flow_details with only part of the atoms plus a new one: the
    # stored-only atom is kept and returned; given atoms keep their identity
    part = models.FlowDetail(fd.name, fd.uuid)
    part.state, part.meta = states.SUCCESS, {"m": 2}
    new_ad = models.TaskDetail("task-2", uuid=str(uuid.uuid4()))
    new_ad.results = (1, 2)
    part.add(td2)
    part.add(new_ad)
    merged = conn.update_flow_details(part)
    assert merged.state == states.SUCCESS and merged.meta == {"m": 2}
    assert {a.uuid for a in merged} == {td.uuid, rd.uuid, new_ad.uuid}
    assert merged.find(new_ad.uuid) is new_ad
    assert merged.find(rd.uuid).to_dict() == rd.to_dict()
    stored = conn.get_flow_details(fd.uuid)
    assert stored.state == states.SUCCESS
    assert stored.find(new_ad.uuid).results == [1, 2]  # JSON: tuple -> list

    # save_logbook on a stored book: meta replaced, new flow inserted, and
    # the returned book holds every stored flow
    book2 = models.LogBook(book.name, uuid=book.uuid)
    book2.meta = {"owner": "other"}
    fd3 = models.FlowDetail("flow-3", uuid=str(uuid.uuid4()))
    fd3.add(models.TaskDetail("task-3", uuid=str(uuid.uuid4())))
    book2.add(fd3)
    saved = conn.save_logbook(book2)
    assert saved.meta == {"owner": "other"}
    assert {f.uuid for f in saved} == {f.uuid for f in book} | {fd3.uuid}
    assert len(saved.find(fd.uuid)) == 3
    again = conn.get_logbook(book.uuid)
    assert again.meta == {"owner": "other"} and len(again) == 3
    assert len(again.find(fd3.uuid)) == 1

    # atom of the wrong kind under a stored uuid
    wrong = models.RetryDetail(td.name, td.uuid)
    with pytest.raises(exc.NotImplementedError):
        conn.update_atom_details(wrong)


def test_not_found_and_ignore_missing(backend):
    conn = backend.get_connection()
    missing = str(uuid.uuid4())
    for call in (lambda: conn.get_logbook(missing),
                 lambda: conn.get_flow_details(missing),
                 lambda: conn.get_atom_details(missing),
                 lambda: conn.get_flows_for_book(missing),
                 lambda: conn.get_atoms_for_flow(missing),
                 lambda: conn.destroy_logbook(missing),
                 lambda: conn.update_atom_details(
                     models.TaskDetail("t", missing)),
                 lambda: conn.update_flow_details(
                     models.FlowDetail("f", missing))):
        with pytest.raises(exc.NotFound):
            call()
    lone = models.FlowDetail("lone", missing)
    lone.add(models.TaskDetail("t", str(uuid.uuid4())))
    assert len(conn.update_flow_details(lone, ignore_missing=True)) == 1
    assert len(conn.get_flow_details(missing)) == 1
    conn.validate()


def test_destroy_and_clear_all(backend):
    conn = backend.get_connection()
    keep, drop = _sample_book(), _sample_book()
    conn.save_logbook(keep)
    conn.save_logbook(drop)
    conn.destroy_logbook(drop.uuid)
    with pytest.raises(exc.NotFound):
        conn.get_logbook(drop.uuid)
    for fd in drop:
        with pytest.raises(exc.NotFound):
            conn.get_flow_details(fd.uuid)
        for ad in fd:
            with pytest.raises(exc.NotFound):
                conn.get_atom_details(ad.uuid)
    _assert_book_equal(conn.get_logbook(keep.uuid), keep)
    conn.clear_all()
    assert list(conn.get_logbooks()) == []
    with pytest.raises(exc.NotFound):
        conn.get_flow_details(next(iter(keep)).uuid)


# ------------------------------------------------------------ TaskFlow engines
_Crash = logged_flow.Crash
_log_lines = logged_flow.log_lines


def chain_flow(log, crash_flag=None, fail_at=None, n=4):
    """Module-level factory (load_from_detail re-imports it by name)."""
    return logged_flow.chain(logged_flow.LoggedStep, log, crash_flag, fail_at=fail_at, n=n)


def test_engine_failure_reverts_and_persists(backend, tmp_path):
    log = str(tmp_path / "log")
    book = models.LogBook("run")
    eng = taskflow.engines.load(chain_flow(log, fail_at=2), store={"x": 1},
                                backend=backend, book=book)
    with pytest.raises(RuntimeError, match="step s2 failed"):
        eng.run()
    assert _log_lines(log) == ["execute s0", "execute s1", "execute s2",
                               "revert s2", "revert s1", "revert s0"]
    fresh = P.SQLBackend.from_url(backend.engine.url)
    fd = fresh.get_connection().get_flow_details(eng.storage.flow_uuid)
    assert fd.state == states.REVERTED
    by_name = {ad.name: ad for ad in fd}
    for name in ("s0", "s1", "s2"):
        assert by_name[name].state == states.REVERTED
        assert by_name[name].intention == states.REVERT
    assert by_name["s3"].state == states.PENDING  # never ran
    assert by_name["s1"].revert_results == "undo-s1"
    assert by_name["s1"].results == 3  # REVERTED keeps the result...
    assert by_name["s2"].failure.exception_str == "step s2 failed"
    assert by_name["s2"].failure.check(RuntimeError)  # ...and the failure
    assert {ad.name for ad in fresh.get_connection().get_logbook(
        book.uuid).find(fd.uuid)} == set(by_name)
    fresh.close()


@pytest.mark.parametrize("engine_kind", ["serial", "parallel"])
def test_resume_after_crash(backend, tmp_path, engine_kind):
    log, flag = str(tmp_path / "log"), str(tmp_path / "crash")
    open(flag, "w").close()
    book = models.LogBook("resume")
    eng = taskflow.engines.load_from_factory(
        chain_flow, factory_args=[log], factory_kwargs={"crash_flag": flag},
        store={"x": 1}, backend=backend, book=book, engine=engine_kind)
    with pytest.raises(_Crash):
        eng.run()
    assert _log_lines(log) == ["execute s0", "execute s1", "execute s2"]

    fresh = P.SQLBackend.from_url(backend.engine.url)  # "another process"
    fd = fresh.get_connection().get_flow_details(eng.storage.flow_uuid)
    assert fd.state == states.RUNNING
    assert {ad.name: ad.state for ad in fd if ad.name.startswith("s")} == {
        "s0": states.SUCCESS, "s1": states.SUCCESS,
        "s2": states.RUNNING, "s3": states.PENDING}
    resumed = taskflow.engines.load_from_detail(fd, backend=fresh,
                                                engine=engine_kind)
    resumed.run()
    # completed tasks are not run again; the interrupted one is (at least once)
    assert _log_lines(log)[3:] == ["execute s2", "execute s3"]
    assert resumed.storage.fetch("v3") == 5
    final = fresh.get_connection().get_flow_details(fd.uuid)
    assert final.state == states.SUCCESS
    assert {ad.state for ad in final if ad.name.startswith("s")} == {
        states.SUCCESS}
    fresh.close()


def test_parallel_engine_unordered(backend, tmp_path):
    log = str(tmp_path / "log")
    flow = uf.Flow("fan")
    for i in range(8):
        flow.add(logged_flow.LoggedStep("p%d" % i, log, provides="r%d" % i))
    eng = taskflow.engines.load(flow, store={"x": 1}, backend=backend,
                                engine="parallel", max_workers=4)
    eng.run()
    fd = backend.get_connection().get_flow_details(eng.storage.flow_uuid)
    assert fd.state == states.SUCCESS
    assert sorted(ad.results for ad in fd if ad.name.startswith("p")) == [2] * 8


# ---------------------------------------------------------------- concurrency
def _sqlite_backend(tmp_path, name="c.db"):
    be = P.SQLBackend.from_url("sqlite:///%s" % (tmp_path / name))
    P.create_schema(be.engine)
    return be


def test_concurrent_flows_threads_and_processes(tmp_path):
    be = _sqlite_backend(tmp_path)
    log = str(tmp_path / "log")
    errors, done = [], []

    def worker():
        try:
            eng = taskflow.engines.load(chain_flow(log, n=5), store={"x": 0},
                                        backend=be)
            eng.run()
            done.append(eng.storage.flow_uuid)
        except Exception as e:  # noqa: BLE001 - collected and asserted
            errors.append(repr(e))

    # two other processes write the same file meanwhile
    script = (
        "import taskflow.engines\n"
        "from taskflow import task\n"
        "from taskflow.patterns import linear_flow as lf\n"
        "from migrateflow import persistence as P\n"
        "class Step(task.Task):\n"
        "    def execute(self):\n"
        "        with open(%r, 'a') as f:\n"
        "            f.write('execute ' + self.name + chr(10))\n"
        "be = P.SQLBackend.from_url(%r)\n"
        "for i in range(10):\n"
        "    flow = lf.Flow('p').add(*[Step('s%%d' %% j) for j in range(5)])\n"
        "    taskflow.engines.load(flow, backend=be).run()\n"
    ) % (log, str(be.engine.url))
    procs = [subprocess.Popen([sys.executable, "-c", script],
                              stderr=subprocess.PIPE) for _ in range(2)]
    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    assert errors == []
    conn = be.get_connection()
    for fd_uuid in done:
        assert conn.get_flow_details(fd_uuid).state == states.SUCCESS
    assert len(conn.get_logbooks(lazy=True)) == 40
    assert _log_lines(log).count("execute s4") == 40
    be.close()


def test_writer_waits_for_foreign_lock(tmp_path):
    """A write lock held elsewhere makes us wait (busy_timeout), not fail."""
    be = _sqlite_backend(tmp_path)
    book = _sample_book()
    other = sqlite3.connect(str(tmp_path / "c.db"), isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.5, other.execute, ("COMMIT",))
    timer.start()
    be.get_connection().save_logbook(book)
    timer.join()
    assert be.get_connection().get_logbook(book.uuid).name == book.name


def test_writes_begin_immediate_reads_deferred(tmp_path):
    be = _sqlite_backend(tmp_path)
    probe = sqlite3.connect(str(tmp_path / "c.db"), isolation_level=None,
                            timeout=0)
    with be.engine.connect() as conn, conn.begin():
        # nothing written yet, but the write lock is already ours
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")
    with be._reader.connect() as conn:
        conn.execute(sa.select(P.LOGBOOKS)).all()
        probe.execute("BEGIN IMMEDIATE")  # a reader does not block writers
        probe.execute("ROLLBACK")


def _pragmas(engine):
    with engine.connect() as conn:
        return tuple(conn.exec_driver_sql("PRAGMA " + p).scalar()
                     for p in ("journal_mode", "synchronous", "busy_timeout"))


def test_tune_oslo_engine_twice(tmp_path):
    url = "sqlite:///%s" % (tmp_path / "oslo.db")
    engine = oslo_engines.create_engine(url, max_retries=0)
    assert isinstance(engine.pool, sa.pool.NullPool)  # what oslo.db does
    P.tune_sqlite_engine(engine, "FULL")
    P.tune_sqlite_engine(engine, "FULL")
    assert isinstance(engine.pool, sa.pool.QueuePool)
    assert _pragmas(engine) == ("wal", 2, 30000)
    assert len(engine.pool.dispatch.connect) == len(
        P.tune_sqlite_engine(engine, "FULL").pool.dispatch.connect)
    P.tune_sqlite_engine(engine, "NORMAL")
    assert _pragmas(engine) == ("wal", 1, 30000)
    be = P.SQLBackend(engine)
    P.create_schema(engine)
    eng = taskflow.engines.load(chain_flow(str(tmp_path / "log")),
                                store={"x": 1}, backend=be)
    eng.run()
    assert be.get_connection().get_flow_details(
        eng.storage.flow_uuid).state == states.SUCCESS
    # oslo.db's own BEGIN hook stays quiet: no nested BEGIN error above, and
    # a plain engine transaction still works
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT 1")
    engine.dispose()


def test_backend_tunes_untuned_engine_but_keeps_synchronous(tmp_path):
    url = "sqlite:///%s/plain.db" % tmp_path
    engine = oslo_engines.create_engine(url, max_retries=0,
                                        sqlite_synchronous=False)
    be = P.SQLBackend(engine)
    assert isinstance(engine.pool, sa.pool.QueuePool)
    assert _pragmas(engine) == ("wal", 0, 30000)  # oslo.db's OFF is kept
    P.create_schema(engine)
    be.get_connection().save_logbook(_sample_book())
    assert len(be.get_connection().get_logbooks()) == 1
    P.tune_sqlite_engine(engine, None)  # None never changes a choice
    assert _pragmas(engine) == ("wal", 0, 30000)
    engine.dispose()


# --------------------------------------------------------------------- memory
def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat(tmp_path):
    engine = _sqlite_backend(tmp_path, "mem.db").engine
    log = str(tmp_path / "log")

    def run(n):
        for _ in range(n):
            be = P.SQLBackend(engine)  # a backend object per flow, too
            eng = taskflow.engines.load(chain_flow(log, n=6), store={"x": 0},
                                        backend=be)
            eng.run()
            with contextlib.closing(be.get_connection()) as conn:
                conn.get_flow_details(eng.storage.flow_uuid)

    run(100)
    after_100 = _rss_mb()
    run(200)
    growth = _rss_mb() - after_100
    assert growth < 20, "RSS grew %.1f MB over 200 flows" % growth
