"""SQLite fitted for concurrent durable writers, for the state database and
the flow persistence alike: WAL, a busy timeout, a real connection pool,
and ``BEGIN IMMEDIATE`` so writers queue instead of failing."""
import sqlite3
import threading
import weakref

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool

#: execution option read by the SQLite ``begin`` hook: "DEFERRED", "IMMEDIATE"
#: (used when the option is unset) or "EXCLUSIVE"
SQLITE_BEGIN_OPTION = "migrateflow_sqlite_begin"


def is_tuned(engine):
    return engine in _tuned


def is_memory_sqlite(url):
    return url.database in (None, "", ":memory:") or "mode=memory" in str(url)


_tuned = weakref.WeakKeyDictionary()  # engine -> its tuning state
_tune_lock = threading.Lock()


def _on_begin(conn):
    dbapi_con = conn.connection.driver_connection
    options = conn.get_execution_options()
    if dbapi_con.in_transaction or options.get("isolation_level") == \
            "AUTOCOMMIT":
        return  # begun already (e.g. by oslo.db's own hook), or autocommit
    sql = "BEGIN " + options.get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
    try:  # straight to sqlite3: a SQLAlchemy execute here costs ~40 us
        dbapi_con.execute(sql)
    except sqlite3.Error as e:
        raise sa_exc.DBAPIError.instance(sql, (), e, sqlite3.Error) from e
    conn.info["in_transaction"] = True  # oslo.db's hook then emits no BEGIN


def _on_end(conn):
    conn.info.pop("in_transaction", None)


def _on_checkin(dbapi_con, record):
    if record is not None:
        record.info.pop("in_transaction", None)


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
                old._creator, pool_size=pool_size, max_overflow=max_overflow,
                timeout=30, recycle=old._recycle, echo=old.echo,
                logging_name=old._orig_logging_name, pre_ping=False,
                reset_on_return=old._reset_on_return, dialect=old._dialect,
                _dispatch=old.dispatch)
            old.dispose()

        def on_connect(dbapi_con, record):
            dbapi_con.isolation_level = None  # _on_begin emits BEGIN
            dbapi_con.execute("PRAGMA busy_timeout=30000")
            if state["file"]:
                dbapi_con.execute("PRAGMA journal_mode=WAL")
            if state["synchronous"]:
                dbapi_con.execute("PRAGMA synchronous=" + state["synchronous"])

        for event, hook in (("connect", on_connect), ("checkin", _on_checkin),
                            ("commit", _on_end), ("rollback", _on_end)):
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
