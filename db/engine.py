"""Engines for the state database, built by oslo.db's enginefacade.

One ``transaction_context`` per database URL, cached for the process: tasks
look the database up from configuration at run time, never hold it in the
store.  SQLite files get WAL journalling, a busy timeout, a connection pool and
``BEGIN IMMEDIATE`` transactions so concurrent writers queue instead of
failing (``db.sqlite``, shared with flow persistence).
"""
import os
import threading

import sqlalchemy as sa
from oslo_db.sqlalchemy import enginefacade

from migrateflow.db import sqlite

_lock = threading.Lock()
_contexts = {}


def _sqlite_path(url):
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    return parsed.database or None


def get_context(url, synchronous="NORMAL"):
    """The enginefacade transaction context for ``url`` (built once)."""
    with _lock:
        ctx = _contexts.get(url)
        if ctx is not None:
            return ctx
        path = _sqlite_path(url)
        hooks = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # oslo.db forces a NullPool on SQLite files (a new connection per
            # transaction: measured 1.5 ms per write against 0.22 ms pooled);
            # the tuning puts a QueuePool back and turns WAL on
            hooks.append(lambda engine: sqlite.tune_sqlite_engine(engine, synchronous))
        ctx = enginefacade.transaction_context()
        # thread_checkin adds a sleep(0) per connection check-in for
        # eventlet; under plain threads it only costs (~0.1 ms each)
        ctx.configure(connection=url, on_engine_create=hooks, max_retries=3,
                      retry_interval=1, sqlite_fk=False, thread_checkin=False)
        _contexts[url] = ctx
        return ctx


def _after_fork_in_child():
    """A forked child (a drain's worker) gets pools of its own: a database
    connection must not be used by two processes (the parent keeps its own,
    neither used nor closed here)."""
    for ctx in list(_contexts.values()):
        try:
            engine = ctx.writer.get_engine() if ctx._factory._started else None
        except Exception:  # noqa: BLE001 - not started: nothing pooled
            engine = None
        if engine is not None:
            engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def forget(url):
    """Drop the cached context for ``url`` (tests delete their databases)."""
    with _lock:
        ctx = _contexts.pop(url, None)
    if ctx is not None:
        try:
            ctx.writer.get_engine().dispose()
        except Exception:  # noqa: BLE001 - never started: nothing to close
            pass
