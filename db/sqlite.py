"""SQLite fitted for concurrent durable writers, for the state database and
the flow persistence alike: WAL, a busy timeout, a real connection pool,
and ``BEGIN IMMEDIATE`` so writers queue instead of failing."""
import collections
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import weakref

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool

from migrateflow import lifecycle

#: execution option read by the SQLite ``begin`` hook: "DEFERRED", "IMMEDIATE"
#: (used when the option is unset) or "EXCLUSIVE"
SQLITE_BEGIN_OPTION = "migrateflow_sqlite_begin"


def is_tuned(engine):
    return engine in _tuned


def is_memory_sqlite(url):
    return url.database in (None, "", ":memory:") or "mode=memory" in str(url)


_tuned = weakref.WeakKeyDictionary()  # engine -> its tuning state
_tune_lock = threading.Lock()


# -- the writers' queue, per database file -----------------------------------
# SQLite lets one writer at a time into a file; the others sleep in its busy
# handler (1, 2, 5, 10, ... 100 ms) and try again, so under load a writer
# often sleeps long after the lock was free (two processes writing the same
# files then do no more than one), and every failed try costs CPU.  Writers
# first queue here, and each is woken as soon as the lock is free: the
# writers of one process on a plain lock per file, then those of every
# process on an flock of ``<file>-writer`` beside it (the kernel wakes the
# next; it is let go when its holder dies).  A thread that holds one file's
# writer lock does not queue for another's (nobody waits here while holding
# a place: no deadlock), nor does a writer that waited
# WRITER_QUEUE_TIMEOUT_S in its process: SQLite's own wait decides then.
# A thread that takes turns (``lifecycle.Turns``) gives its turn away while
# it queues behind another thread of its process.
WRITER_QUEUE_TIMEOUT_S = 30.0
_WRITER_LOCK = "migrateflow_writer_lock"
_writer_locks = {}
_writer_locks_guard = threading.Lock()
_holding = collections.Counter()  # thread ident -> writer locks it holds
_paths = {}  # url.database -> the file's absolute path (None: in memory)


class WriterLock:
    """The writers' queue of one database file (see above)."""

    def __init__(self, path):
        self._local = threading.Lock()
        self._sidecar = path + "-writer"
        self._fd = None
        self._owner = None

    def locked(self):
        return self._local.locked()

    def acquire(self, timeout=WRITER_QUEUE_TIMEOUT_S):
        if not self._local.acquire(blocking=False):
            # another thread of ours writes: a wait, after which this thread
            # holds the lock and runs first (the others would wait for it)
            with lifecycle.waiting(first_back=True):
                if not self._local.acquire(timeout=timeout):
                    return False
        try:
            if self._fd is None:
                self._fd = os.open(self._sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                   0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:  # a read-only place: this process's queue only
            self._fd = None
        self._owner = threading.get_ident()
        _holding[self._owner] += 1
        return True

    def release(self):
        owner, self._owner = self._owner, None
        _holding[owner] -= 1
        if not _holding[owner]:
            del _holding[owner]
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._local.release()


def _writer_lock(path):
    lock = _writer_locks.get(path)
    if lock is None:
        with _writer_locks_guard:
            lock = _writer_locks.setdefault(path, WriterLock(path))
    return lock


def take_writer_lock(path):
    """Queue for ``path``'s write lock: the lock to release once the write
    transaction ended, or None (no path, waited too long, or this thread
    already holds another file's)."""
    if path is None or _holding.get(threading.get_ident()):
        return None
    lock = _writer_lock(path)
    return lock if lock.acquire() else None


def _after_fork_in_child():
    """A forked child (a drain's worker) starts with no writer of its own,
    and with pools of its own: SQLite connections must not cross a fork
    (its locks are per process), so the inherited ones are left to the
    parent, unused and unclosed."""
    _writer_locks.clear()  # the inherited flock descriptions are the parent's
    _holding.clear()
    for engine in list(_tuned):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _file_of(engine):
    database = engine.url.database
    path = _paths.get(database, False)
    if path is False:
        path = _paths[database] = None if is_memory_sqlite(engine.url) \
            else os.path.abspath(database)
    return path


def _on_begin(conn):
    dbapi_con = conn.connection.driver_connection
    options = conn.get_execution_options()
    if dbapi_con.in_transaction or options.get("isolation_level") == \
            "AUTOCOMMIT":
        return  # begun already (e.g. by oslo.db's own hook), or autocommit
    mode = options.get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
    sql = "BEGIN " + mode
    held = None if mode == "DEFERRED" else take_writer_lock(_file_of(conn.engine))
    try:  # straight to sqlite3: a SQLAlchemy execute here costs ~40 us
        dbapi_con.execute(sql)
    except sqlite3.Error as e:
        if held is not None:
            held.release()
        raise sa_exc.DBAPIError.instance(sql, (), e, sqlite3.Error) from e
    conn.info["in_transaction"] = True  # oslo.db's hook then emits no BEGIN
    if held is not None:
        conn.info[_WRITER_LOCK] = held


def _end(conn, sql):
    """End the transaction here, then let the next writer in (SQLAlchemy's
    own commit or rollback that follows finds nothing left to end)."""
    conn.info.pop("in_transaction", None)
    held = conn.info.pop(_WRITER_LOCK, None)
    if held is None:
        return
    try:
        dbapi_con = conn.connection.driver_connection
        if dbapi_con.in_transaction:
            dbapi_con.execute(sql)
    except sqlite3.Error as e:
        raise sa_exc.DBAPIError.instance(sql, (), e, sqlite3.Error) from e
    finally:
        held.release()


def _on_commit(conn):
    _end(conn, "COMMIT")


def _on_rollback(conn):
    _end(conn, "ROLLBACK")


def _on_checkin(dbapi_con, record):
    if record is not None:
        record.info.pop("in_transaction", None)
        held = record.info.pop(_WRITER_LOCK, None)
        if held is not None:  # never ended through SQLAlchemy (the pool rolled it back)
            held.release()


def tune_sqlite_engine(engine, synchronous="NORMAL", pool_size=10,
                       max_overflow=30):
    """Fit a SQLite engine for concurrent durable writes; no-op otherwise.

    New connections get ``journal_mode=WAL`` (files), ``busy_timeout=30000``
    and ``synchronous`` (OFF, NORMAL, FULL or EXTRA; None leaves it alone); a
    file database's non-queue pool (oslo.db sets ``NullPool``) becomes a
    ``QueuePool`` that keeps its listeners.  pysqlite's own BEGIN is switched
    off and a ``begin`` hook emits ``BEGIN IMMEDIATE``, or the mode named by
    the :data:`SQLITE_BEGIN_OPTION` execution option (read-only work may use
    "DEFERRED").  Connections pooled before are dropped.  Calling it again is
    safe: only a changed ``synchronous`` is applied.  Returns ``engine``.
    """
    if engine.dialect.name != "sqlite":
        return engine
    sync = None if synchronous is None else str(synchronous).upper()
    if sync not in (None, "OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError("invalid sqlite synchronous %r" % (synchronous,))
    with _tune_lock:
        state = _tuned.get(engine)
        if state is not None:
            if sync is not None and state["synchronous"] != sync:
                state["synchronous"] = sync
                if state["file"]:
                    engine.dispose()
            return engine
        state = {"synchronous": sync,
                 "file": not is_memory_sqlite(engine.url)}
        if state["file"] and not isinstance(engine.pool, sa_pool.QueuePool):
            old = engine.pool  # the arguments Pool.recreate() passes on
            engine.pool = sa_pool.QueuePool(
                old._creator, pool_size=pool_size, max_overflow=max_overflow, use_lifo=True,
                timeout=30, recycle=old._recycle, echo=old.echo,
                logging_name=old._orig_logging_name, pre_ping=False,
                reset_on_return=old._reset_on_return, dialect=old._dialect,
                _dispatch=old.dispatch)
            old.dispose()

        def on_connect(dbapi_con, record):
            _set_up(dbapi_con, state)

        for event, hook in (("connect", on_connect), ("checkin", _on_checkin),
                            ("commit", _on_commit), ("rollback", _on_rollback)):
            sa.event.listen(engine, event, hook)
        sa.event.listen(engine, "begin", _on_begin, insert=True)
        # oslo.db's own hook emits a deferred BEGIN and, whatever ``insert``
        # asks, runs first on its engines: a read-then-write transaction
        # then fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT,
        # no busy wait) when another writer committed in between
        for hook in list(engine.dispatch.begin):
            if getattr(hook, "__name__", "") == "_sqlite_emit_begin":
                sa.event.remove(engine, "begin", hook)
        _tuned[engine] = state
        if state["file"]:
            engine.dispose()
    return engine


def _set_up(dbapi_con, state):
    """A new connection of a tuned engine (``state``: its tuning): autocommit
    (``_on_begin`` emits BEGIN), busy timeout, WAL for a file, synchronous."""
    dbapi_con.isolation_level = None
    dbapi_con.execute("PRAGMA busy_timeout=30000")
    if state["file"]:
        _enable_wal(dbapi_con)
    if state["synchronous"]:
        dbapi_con.execute("PRAGMA synchronous=" + state["synchronous"])


def _enable_wal(dbapi_con, timeout=30.0):
    """WAL mode, switched once per file.  The switch needs a moment with no
    other connection to the file: while other processes open a new file at
    once SQLite answers "database is locked" at once (no busy wait), so
    that is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if dbapi_con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                dbapi_con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            lifecycle.sleep(0.01)


def execute_raw(engine, sql, params=(), write=False):
    """One statement in its own transaction straight on a sqlite3
    connection: the rows (reads), or the row count (writes).

    For the few statements run on every step of every flow: SQLAlchemy's
    connection, transaction and execution context cost twice the SQLite
    work there, and a pool's checkout and return (with its rollback) still
    three times (13 us against 4 us for a one-row SELECT), so a file's
    statements run on this thread's own connection to it (made like the
    pool's: ``_own_connection``); an in-memory database's, or one whose
    pool's connections are set up by its creator alone (``synchronous``
    None), on the pool's.
    The statement runs alone in autocommit mode, which is its own
    transaction: a write takes the write lock as its first step, before
    reading anything (so it waits for a busy lock like ``BEGIN IMMEDIATE``,
    never fails on a stale snapshot), and commits when it ends; a read
    sees one snapshot.  One sqlite3 call instead of three: each gives the
    GIL away, and a busy thread then waits for it back.  ``sql`` is
    SQLite's own (``?`` parameters); results are not type-processed (the
    caller knows its columns); errors are sqlite3's.
    """
    if not raw_capable(engine):
        fairy = engine.raw_connection()
        try:
            return _execute(fairy.driver_connection, None, sql, params, write)
        finally:
            fairy.close()
    path = _file_of(engine)
    return _execute(_own_connection(engine, path), path, sql, params, write)


def raw_capable(engine):
    """True when ``engine``'s statements may run on each thread's own
    sqlite3 connection (``execute_raw``, ``raw_transaction``): a file
    database whose pool's connections this module sets up."""
    return _file_of(engine) is not None and bool((_tuned.get(engine) or {}).get("synchronous"))


@contextlib.contextmanager
def raw_transaction(engine):
    """One write transaction of several statements straight on this
    thread's own sqlite3 connection to ``engine``'s file (``raw_capable``
    engines only; why: ``execute_raw``): the writer lock, ``BEGIN
    IMMEDIATE``, the body's statements, ``COMMIT`` (``ROLLBACK`` when the
    body or the commit raised).  Yields the sqlite3 connection; errors are
    sqlite3's."""
    path = _file_of(engine)
    dbapi_con = _own_connection(engine, path)
    held = take_writer_lock(path)
    try:
        dbapi_con.execute("BEGIN IMMEDIATE")
        try:
            yield dbapi_con
            dbapi_con.execute("COMMIT")
        except BaseException:
            if dbapi_con.in_transaction:
                dbapi_con.execute("ROLLBACK")
            raise
    finally:
        if held is not None:
            held.release()


def _execute(dbapi_con, path, sql, params, write):
    if not write:
        return dbapi_con.execute(sql, params).fetchall()
    held = take_writer_lock(path)
    try:
        return dbapi_con.execute(sql, params).rowcount
    finally:
        if held is not None:
            held.release()


_own = threading.local()  # this thread's connections: {engine: (connection, synchronous)}
_INHERITED = []  # a forked child's inherited connections: the parent's, never closed here


def _own_connection(engine, path):
    """This thread's own sqlite3 connection to ``engine``'s file, set up
    as the engine's pool sets its connections up (``_set_up``).  A thread
    keeps one per engine while both live; a forked child makes its own."""
    conns = getattr(_own, "conns", None)
    if conns is None or _own.pid != os.getpid():
        if conns is not None:
            _INHERITED.append(conns)
        conns = _own.conns = weakref.WeakKeyDictionary()
        _own.pid = os.getpid()
    state = _tuned[engine]
    found = conns.get(engine)
    if found is not None and found[1] == state["synchronous"]:
        return found[0]
    conn = sqlite3.connect(path, timeout=30.0)
    _set_up(conn, state)
    conns[engine] = (conn, state["synchronous"])
    return conn
