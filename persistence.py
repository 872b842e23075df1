"""Durable TaskFlow persistence on SQLAlchemy Core with shared module-level tables.

Replaces ``taskflow.persistence.backends.impl_sqlalchemy``, which builds new
``MetaData``/``Enum`` tables per connection (an unbounded leak under SQLAlchemy
2.1) and forces ``NullPool`` on SQLite files.  Each detail is stored as the JSON
of its ``to_dict()`` beside a few indexed columns, with statements built once.
An atom update is one ``UPDATE`` (TaskFlow's atom merge replaces every field,
so nothing needs reading); a flow update reads its atoms' JSON once and writes
only new or changed rows; a new logbook, and the flow's and atoms' updates, go
straight to SQLite on a SQLite file.  SQLite: see :func:`tune_sqlite_engine`.
The tables and statements are ``persistence_schema``'s.
"""
import json
import random
import sqlite3
import threading
import time

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool
from taskflow import exceptions as exc
from taskflow.persistence import base
from taskflow.persistence import models

from migrateflow import lifecycle
from migrateflow.db import sqlite
from migrateflow.db.sqlite import SQLITE_BEGIN_OPTION, tune_sqlite_engine  # noqa: F401
# the tables and create_schema are this module's API too
from migrateflow.persistence_schema import (  # noqa: F401
    ATOMDETAILS, FLOWDETAILS, LOGBOOKS, METADATA, create_schema)
from migrateflow.persistence_schema import (
    AD, DEL_BOOK, FD, INS_AD, INS_FD, INS_LB, LB, SEL_AD, SEL_ADS, SEL_AD_BY_FD, SEL_AD_BY_LB,
    SEL_FD, SEL_FDS, SEL_FD_BY_LB, SEL_LB, UPD_AD, UPD_FD, UPD_LB, atom_from, book_from, encode,
    now as _now)

try:
    from oslo_db import exception as _db_exc
    _DB_ERRORS = (sa_exc.SQLAlchemyError, _db_exc.DBError, sqlite3.Error)
except ImportError:  # pragma: no cover - oslo.db is a dependency
    _db_exc, _DB_ERRORS = None, (sa_exc.SQLAlchemyError, sqlite3.Error)

_RETRY_MARKERS = ("database is locked", "database table is locked", "deadlock",
                  "lock wait timeout", "could not serialize")


def _save_new_book(engine, book):
    """Store a new logbook, its flows and their atoms in one transaction
    straight on SQLite (as the atoms' updates); False, with nothing done,
    when the book is stored already (merged through SQLAlchemy then)."""
    now = _now().isoformat(" ", "microseconds")  # as SQLAlchemy's SQLite DateTime
    with sqlite.raw_transaction(engine) as db:
        if db.execute("SELECT 1 FROM tf_logbooks WHERE uuid = ?", (book.uuid,)).fetchone():
            return False
        db.execute("INSERT INTO tf_logbooks (uuid, name, updated_at, data) VALUES (?, ?, ?, ?)",
                   (book.uuid, book.name, now, encode(book.to_dict(marshal_time=True))))
        for fd in book:
            db.execute("INSERT INTO tf_flowdetails (uuid, name, parent_uuid, state, updated_at, "
                       "data) VALUES (?, ?, ?, ?, ?, ?)",
                       (fd.uuid, fd.name, book.uuid, fd.state, now, encode(fd.to_dict())))
            db.executemany(
                "INSERT INTO tf_atomdetails (uuid, name, parent_uuid, state, atom_type, "
                "updated_at, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(ad.uuid, ad.name, fd.uuid, ad.state, models.atom_detail_type(ad), now,
                  encode(ad.to_dict())) for ad in fd])
    return True


def _one(conn, stmt, uuid, kind):
    row = conn.execute(stmt, {"u": uuid}).first()
    if row is None:
        raise exc.NotFound("No %s found with uuid '%s'" % (kind, uuid))
    return row


def _retryable(err):
    if _db_exc is not None and isinstance(err, (_db_exc.DBDeadlock, _db_exc.DBConnectionError)):
        return True  # a new attempt gets a new connection
    if isinstance(err, sa_exc.PendingRollbackError):
        return True  # the connection was lost inside the transaction
    if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
        return True
    msg = str(getattr(err, "orig", None) or err).lower()
    return any(marker in msg for marker in _RETRY_MARKERS)


class SQLBackend(base.Backend):
    """TaskFlow backend on a SQLAlchemy engine holding the ``tf_*`` tables.

    A SQLite engine not yet tuned here gets :func:`tune_sqlite_engine` with
    ``synchronous=None`` (left as the engine's creator set it; SQLite's own
    default is FULL): call that function first to choose.
    """

    def __init__(self, engine, conf=None, owns_engine=False):
        super().__init__(conf if conf is not None else {
            "connection": engine.url.render_as_string()})
        if engine.dialect.name == "sqlite" and not sqlite.is_tuned(engine):
            tune_sqlite_engine(engine, None)
        self._engine, self._owns_engine = engine, owns_engine
        self._reader = engine.execution_options(
            **{SQLITE_BEGIN_OPTION: "DEFERRED"})
        self._upgrade_lock = threading.Lock()
        # every atom update runs this pre-rendered SQL: skipping the statement
        # cache lookup halves SQLAlchemy's cost of the statement
        self._upd_ad, self._upd_fd = (
            (compiled.string, compiled.positiontup, engine.dialect.name == "sqlite")
            for compiled in (stmt.compile(dialect=engine.dialect) for stmt in (UPD_AD, UPD_FD)))

    @classmethod
    def from_url(cls, url, sqlite_synchronous="NORMAL", **engine_kwargs):
        """Build, tune and own an engine for ``url``."""
        u = sa.engine.make_url(url)
        kw = {"pool_recycle": 3600}
        if u.get_backend_name() == "sqlite":
            kw["connect_args"] = {"check_same_thread": False}
            if sqlite.is_memory_sqlite(u):
                kw["poolclass"] = sa_pool.StaticPool
            else:
                kw.update(poolclass=sa_pool.QueuePool, pool_size=10,
                          max_overflow=30, pool_timeout=30)
        elif u.get_backend_name() in ("mysql", "mariadb"):
            kw["isolation_level"] = "READ COMMITTED"
        engine = sa.create_engine(u, **dict(kw, **engine_kwargs))
        tune_sqlite_engine(engine, sqlite_synchronous)
        return cls(engine, {"connection": str(u)}, owns_engine=True)

    @property
    def engine(self):
        return self._engine

    def get_connection(self):
        return Connection(self)

    def close(self):
        if self._owns_engine:
            self._engine.dispose()


class Connection(base.Connection):
    def __init__(self, backend):
        self._backend = backend

    @property
    def backend(self):
        return self._backend

    def close(self):
        pass

    def _run(self, write, what, fn, *args):
        """``fn(conn, *args)``, in a write transaction if ``write``.

        Lock conflicts, deadlocks and lost connections are retried briefly
        (SQLite has already waited up to busy_timeout in a failed attempt
        that took long: those are not); other database errors raise
        StorageFailure.
        """
        engine = self._backend._engine if write else self._backend._reader

        def attempt():
            with engine.connect() as conn:
                if not write:
                    return fn(conn, *args)
                with conn.begin():
                    return fn(conn, *args)
        return self._retrying(what, attempt)

    @staticmethod
    def _retrying(what, attempt_fn):
        deadline = time.monotonic() + 2.0
        for attempt in range(8):
            try:
                return attempt_fn()
            except _DB_ERRORS as e:
                if attempt < 7 and time.monotonic() < deadline and \
                        _retryable(e):
                    lifecycle.sleep(min(0.2, 0.005 * 2 ** attempt) *
                                    (0.5 + random.random()))
                    continue
                exc.raise_with_cause(exc.StorageFailure, "Failed %s" % what)

    def validate(self):
        self._run(False, "validating", lambda c: c.exec_driver_sql("SELECT 1"))

    def upgrade(self):
        with self._backend._upgrade_lock:
            try:
                create_schema(self._backend.engine)
            except _DB_ERRORS:
                exc.raise_with_cause(exc.StorageFailure, "Failed upgrading")

    def clear_all(self):
        self._run(True, "clearing all", lambda conn: [
            conn.execute(table.delete()) for table in (AD, FD, LB)])

    def update_atom_details(self, atom_detail):
        ad, (sql, order, on_sqlite) = atom_detail, self._backend._upd_ad
        now = _now()
        try:
            row = {"b_uuid": ad.uuid, "b_type": models.atom_detail_type(ad),
                   "state": ad.state, "data": encode(ad.to_dict()),
                   # as SQLAlchemy's SQLite DateTime would bind it
                   "updated_at": now.isoformat(" ", "microseconds")
                   if on_sqlite else now}
        except (TypeError, ValueError):
            exc.raise_with_cause(exc.StorageFailure,
                                 "Cannot serialize atom '%s'" % ad.uuid)
        params = row if order is None else tuple(row[k] for k in order)

        what = "updating atom details '%s'" % ad.uuid
        if on_sqlite and self._retrying(what, lambda: sqlite.execute_raw(
                self._backend._engine, sql, params, write=True)):
            return type(ad)(ad.name, ad.uuid).update(ad)

        def update(conn):  # elsewhere, or nothing updated: say why
            if conn.exec_driver_sql(sql, params).rowcount == 0:
                found = _one(conn, SEL_AD, ad.uuid, "atom details")
                raise exc.NotImplementedError("Atom '%s' is stored as %s"
                                              % (ad.uuid, found.atom_type))
        self._run(True, what, update)
        return type(ad)(ad.name, ad.uuid).update(ad)

    def _save_flow(self, conn, fd, parent_uuid, now, new=False,
                   must_exist=True):
        """Upsert a flow row and its atoms; return the merged flow detail."""
        row = {"state": fd.state, "data": encode(fd.to_dict()),
               "updated_at": now, "b_uuid": fd.uuid}
        stored = {}
        if not new and conn.execute(UPD_FD, row).rowcount:
            stored = {r.uuid: (r.atom_type, r.data)
                      for r in conn.execute(SEL_AD_BY_FD, {"u": fd.uuid})}
        elif must_exist and not new:
            raise exc.NotFound("No flow details found with uuid '%s'" % fd.uuid)
        else:
            del row["b_uuid"]
            conn.execute(INS_FD, dict(row, uuid=fd.uuid, name=fd.name,
                                       parent_uuid=parent_uuid))
        merged = models.FlowDetail(fd.name, fd.uuid)
        merged.state, merged.meta = fd.state, fd.meta
        inserts, updates = [], []
        for ad in fd:
            arow = {"state": ad.state, "updated_at": now,
                    "data": encode(ad.to_dict())}
            atom_type, old = models.atom_detail_type(ad), stored.pop(ad.uuid,
                                                                     None)
            if old is None:
                inserts.append(dict(arow, uuid=ad.uuid, parent_uuid=fd.uuid,
                                    name=ad.name, atom_type=atom_type))
            elif old[0] != atom_type:
                raise exc.NotImplementedError(
                    "Atom '%s' is stored as %s" % (ad.uuid, old[0]))
            elif old[1] != arow["data"]:
                updates.append(dict(arow, b_uuid=ad.uuid, b_type=atom_type))
            merged.add(ad)  # identity kept: Storage.inject relies on it
        for atom_type, data in stored.values():
            merged.add(atom_from(atom_type, data))
        if inserts:
            conn.execute(INS_AD, inserts)
        if updates:
            conn.execute(UPD_AD, updates)
        return merged

    def update_flow_row(self, flow_detail):
        """Write the flow's own row only (its state and metadata): for a
        caller that knows each of its atoms is stored as it holds it.  Not
        part of TaskFlow's connection API (see ``serial_storage.Storage``)."""
        fd, (sql, order, on_sqlite) = flow_detail, self._backend._upd_fd
        now = _now()
        row = {"state": fd.state, "data": encode(fd.to_dict()), "updated_at": now,
               "b_uuid": fd.uuid}
        what = "updating flow details '%s'" % fd.uuid
        if on_sqlite and self._retrying(what, lambda: sqlite.execute_raw(
                self._backend._engine, sql,
                tuple(row[k] if k != "updated_at" else now.isoformat(" ", "microseconds")
                      for k in order), write=True)):
            return  # as the atoms' updates: straight on SQLite

        def update(conn):  # elsewhere, or nothing updated: say why
            if not conn.execute(UPD_FD, row).rowcount:
                raise exc.NotFound("No flow details found with uuid '%s'" % fd.uuid)
        self._run(True, what, update)

    def update_flow_details(self, flow_detail, ignore_missing=False):
        return self._run(True, "updating flow details '%s'" % flow_detail.uuid,
                         self._save_flow, flow_detail, None, _now(), False,
                         not ignore_missing)

    def save_logbook(self, book):
        engine = self._backend._engine
        if self._backend._upd_ad[2] and sqlite.raw_capable(engine) and self._retrying(
                "saving logbook '%s'" % book.uuid, lambda: _save_new_book(engine, book)):
            return book  # a new book (every flow's), straight on SQLite

        def save(conn):
            now = _now()
            row = conn.execute(SEL_LB, {"u": book.uuid}).first()
            if row is None:
                conn.execute(INS_LB, {
                    "uuid": book.uuid, "name": book.name, "updated_at": now,
                    "data": encode(book.to_dict(marshal_time=True))})
                for fd in book:
                    self._save_flow(conn, fd, book.uuid, now, new=True)
                return book
            e_lb = book_from(row.data).merge(book)
            conn.execute(UPD_LB, {
                "b_uuid": book.uuid, "updated_at": now,
                "data": encode(e_lb.to_dict(marshal_time=True))})
            self._populate(conn, {e_lb.uuid: e_lb}, e_lb.uuid)
            for fd in book:
                e_lb.add(self._save_flow(conn, fd, book.uuid, now,
                                         must_exist=False))
            e_lb.updated_at = book.updated_at
            return e_lb
        return self._run(True, "saving logbook '%s'" % book.uuid, save)

    def destroy_logbook(self, book_uuid):
        def destroy(conn):
            for stmt in DEL_BOOK:
                deleted = conn.execute(stmt, {"u": book_uuid}).rowcount
            if not deleted:
                raise exc.NotFound("No logbook found with uuid '%s'" % book_uuid)
        self._run(True, "destroying logbook '%s'" % book_uuid, destroy)

    @staticmethod
    def _populate(conn, books, book_uuid=None, lazy=False):
        """Add to ``books`` (uuid -> book) their flows (and atoms unless
        ``lazy``), keeping the ``updated_at`` that ``LogBook.add`` stamps."""
        one = book_uuid is not None
        stamps = {u: b.updated_at for u, b in books.items()}
        flows = {}
        for parent_uuid, data in conn.execute(
                SEL_FD_BY_LB if one else SEL_FDS, {"u": book_uuid}):
            if parent_uuid in books:
                fd = models.FlowDetail.from_dict(json.loads(data))
                flows[fd.uuid] = fd
                books[parent_uuid].add(fd)
        for u, stamp in stamps.items():
            books[u].updated_at = stamp
        if flows and not lazy:
            for _, parent_uuid, atom_type, data in conn.execute(
                    SEL_AD_BY_LB if one else SEL_ADS, {"u": book_uuid}):
                if parent_uuid in flows:
                    flows[parent_uuid].add(atom_from(atom_type, data))
        return list(flows.values())

    def get_logbook(self, book_uuid, lazy=False):
        def get(conn):
            book = book_from(_one(conn, SEL_LB, book_uuid, "logbook").data)
            if not lazy:
                self._populate(conn, {book_uuid: book}, book_uuid)
            return book
        return self._run(False, "getting logbook '%s'" % book_uuid, get)

    def get_logbooks(self, lazy=False):
        def get(conn):
            books = {b.uuid: b for b in map(book_from, conn.execute(
                sa.select(LB.c.data)).scalars())}
            if books and not lazy:
                self._populate(conn, books)
            return list(books.values())
        return self._run(False, "getting logbooks", get)

    def get_flows_for_book(self, book_uuid, lazy=False):
        def get(conn):
            holder = models.LogBook("holder", uuid=book_uuid)
            flows = self._populate(conn, {book_uuid: holder}, book_uuid, lazy)
            if not flows:
                _one(conn, SEL_LB, book_uuid, "logbook")
            return flows
        return self._run(False, "getting flows of '%s'" % book_uuid, get)

    def get_flow_details(self, fd_uuid, lazy=False):
        def get(conn):
            row = _one(conn, SEL_FD, fd_uuid, "flow details")
            fd = models.FlowDetail.from_dict(json.loads(row.data))
            if not lazy:
                for r in conn.execute(SEL_AD_BY_FD, {"u": fd_uuid}):
                    fd.add(atom_from(r.atom_type, r.data))
            return fd
        return self._run(False, "getting flow details '%s'" % fd_uuid, get)

    def get_atom_details(self, ad_uuid):
        def get(conn):
            row = _one(conn, SEL_AD, ad_uuid, "atom details")
            return atom_from(row.atom_type, row.data)
        return self._run(False, "getting atom details '%s'" % ad_uuid, get)

    def get_atoms_for_flow(self, fd_uuid):
        def get(conn):
            atoms = [atom_from(r.atom_type, r.data)
                     for r in conn.execute(SEL_AD_BY_FD, {"u": fd_uuid})]
            if not atoms:
                _one(conn, SEL_FD, fd_uuid, "flow details")
            return atoms
        return self._run(False, "getting atoms of '%s'" % fd_uuid, get)
