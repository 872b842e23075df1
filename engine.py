"""Engine wiring, in one place: persistence, loading, running, resuming,
posting to the jobboard and the conductor that runs posted jobs.

Flows are loaded with ``load_from_factory`` from module-level factories, so
the flow detail records how to rebuild them; ``resume`` (or a conductor
claiming a job) rebuilds and continues a flow from its persisted state.
Every run gets the listeners of ``flow_events``: the step being run goes into
the migration record (``current_step``, what ``migration-show`` tells; a
step executed once it lasted 50 ms), the phases into notifications.
"""
import contextlib
import logging
import os
import socket
import threading
import time

import sqlalchemy as sa
import taskflow.engines
from taskflow import states as tf_states
from taskflow.conductors.backends import impl_nonblocking as nonblocking
from taskflow.jobs import backends as job_backends
from taskflow.listeners import claims
from taskflow.persistence import models as tf_models
from taskflow.persistence.backends import impl_memory, impl_zookeeper
from taskflow.utils import persistence_utils as p_utils

from migrateflow import exceptions as exc
from migrateflow import context, flow_events, graph, lifecycle, persistence, serial_engine
from migrateflow.conf import CONF
from migrateflow.db import api as db_api
from migrateflow.db import sqlite as db_sqlite
from migrateflow.states import (FLOW_ENDED, LIVE_TERMINAL, TRANSITIONAL,
                                MigrationType, MoveStatus, VmState)
from migrateflow.states import LiveMigrationStatus as Status

LOG = logging.getLogger(__name__)

#: taskflow flow states after which nothing runs
_FLOW_DONE = frozenset({tf_states.SUCCESS, tf_states.REVERTED, tf_states.FAILURE})

#: kazoo's default reconnect backoff doubles up to an hour: after a ZooKeeper
#: outage a client could sit idle for many seconds; retry forever, at most
#: a second apart
_ZK_RECONNECT = {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0}

_backends = {}
_boards = {}
_running = set()
_running_lock = threading.Lock()
_backends_lock = threading.Lock()


def persistence_url(conf=CONF):
    """``[persistence] connection``; unset: the state database, or beside a
    SQLite file ``<name>.flows.sqlite`` (one writer at a time per file, and
    a migration writes about as often to its flow as to its records)."""
    if conf.persistence.connection:
        return conf.persistence.connection
    state = db_api.get_db(conf).url
    url = sa.engine.make_url(state)
    if url.get_backend_name() != "sqlite" or db_sqlite.is_memory_sqlite(url):
        return state
    stem, _ext = os.path.splitext(url.database)
    return url.set(database=f"{stem}.flows.sqlite").render_as_string(hide_password=False)


def get_backend(conf=CONF):
    """The flow persistence backend from configuration (one per place)."""
    kind = conf.persistence.backend
    if kind == "memory":
        key = ("memory",)
    elif kind == "zookeeper":
        key = ("zookeeper", ",".join(conf.jobboard.hosts), conf.persistence.zookeeper_path)
    else:
        key = ("sql", persistence_url(conf), conf.persistence.sqlite_synchronous)
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = _make_backend(key, conf)
        return backend


def _make_backend(key, conf):
    if key[0] == "memory":
        return impl_memory.MemoryBackend()
    if key[0] == "sql":
        backend = persistence.SQLBackend.from_url(key[1], sqlite_synchronous=key[2])
        if key[1] != db_api.get_db(conf).url:  # the state database's own are alembic's
            with contextlib.closing(backend.get_connection()) as conn:
                conn.upgrade()  # creates the flow tables unless there
        return backend
    backend = impl_zookeeper.ZkBackend({
        "hosts": key[1], "path": key[2], "timeout": conf.jobboard.session_timeout,
        "connection_retry": dict(_ZK_RECONNECT)})
    with contextlib.closing(backend.get_connection()) as conn:
        conn.upgrade()  # creates the paths
    return backend


def _after_fork_in_child():
    """A forked child (a drain's worker) gets connection pools of its own
    for the SQL flow persistence (see ``db.engine``)."""
    for backend in list(_backends.values()):
        if isinstance(backend, persistence.SQLBackend):
            backend.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def reset():
    """Forget cached backends, boards and built flows (tests point the
    configuration elsewhere)."""
    serial_engine.forget_flows()
    with _backends_lock:
        for board in _boards.values():
            board.close()
        _boards.clear()
        for backend in _backends.values():
            backend.close()
        _backends.clear()


def _new_book(migration_id):
    """One logbook per migration, under the migration's own uuid, so a lost
    job can be posted again from it."""
    return tf_models.LogBook(f"migration-{migration_id}", uuid=migration_id)


def run(factory, store, migration_id, factory_args=(), listeners=()):
    """Build the flow from ``factory``, persist it, run it to its end.

    ``listeners``: extra TaskFlow listener factories, each called with the
    engine (an embedding controller's own, or a test's CaptureListener).
    Returns nothing; raises what the flow raised, or FlowNotStarted when
    the flow could not be persisted (nothing ran; the caller undoes its
    acceptance).  The migration record is never left in a transitional
    status: see ``settle``.
    """
    try:
        engine = serial_engine.load(factory, store, _new_book(migration_id), get_backend(),
                                    factory_args)
    except Exception as err:
        raise exc.FlowNotStarted(f"migration {migration_id} not started: its flow could "
                                 f"not be persisted ({type(err).__name__}: {err})") from err
    db_api.get_db().update_migration(migration_id, flow_uuid=engine.storage.flow_uuid,
                                     owner=process_id())
    _run_engine(engine, migration_id, listeners, owner_recorded=True)


def resume(migration_id, listeners=()):
    """Continue the flow of ``migration_id`` from its last finished step.

    A flow that already ended is not run again (TaskFlow would run it from
    scratch); returns False then.
    """
    mig = db_api.get_db().get_migration(migration_id)
    if not mig["flow_uuid"]:
        raise LookupError(f"migration {migration_id} has no persisted flow")
    backend = get_backend()
    with contextlib.closing(backend.get_connection()) as conn:
        flow_detail = conn.get_flow_details(mig["flow_uuid"])
    if flow_detail.state in _FLOW_DONE:
        return False
    engine = serial_engine.Engine(taskflow.engines.flow_from_detail(flow_detail),
                                  flow_detail, backend)
    _run_engine(engine, migration_id, listeners)
    return True


def process_id():
    """Who runs a flow: "<host name>:<pid>" (recorded as the migration's
    owner, so a sweeper on the same host can tell a live runner)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def running_here():
    """Migrations whose flow runs in this process right now."""
    with _running_lock:
        return set(_running)


def _run_engine(engine, migration_id, listeners=(), owner_recorded=False):
    with context.bind(**flow_events.log_fields(engine)):  # its settle's lines too
        _run_bound(engine, migration_id, listeners, owner_recorded)


def _run_bound(engine, migration_id, listeners, owner_recorded):
    started = time.monotonic()
    if not owner_recorded:
        db_api.get_db().update_migration(migration_id, owner=process_id())
    with _running_lock:
        _running.add(migration_id)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(serial_engine.running(engine))
            stack.enter_context(flow_events.StepMirror(engine, migration_id))
            stack.enter_context(flow_events.FlowEvents(engine))
            for factory in listeners:
                stack.enter_context(factory(engine))
            engine.run()
    except BaseException as err:
        if isinstance(err, Exception):  # a kill or exit: a resume finishes it
            settle(migration_id, f"{type(err).__name__}: {err}")
        raise
    finally:
        with _running_lock:
            _running.discard(migration_id)
        LOG.debug("flow ended migration=%s seconds=%.3f", migration_id,
                  time.monotonic() - started)


def settle(migration_id, reason, status=Status.ERROR):
    """After a flow ended in failure, make sure its migration is not left
    transitional.

    The rollback's last revert marks it failed/cancelled; when a revert
    stopped the rollback (the guest already runs on the destination, or an
    unexpected error) the migration is marked error here and the instance
    is released for the operator.
    """
    db = db_api.get_db()
    mig = db.get_migration(migration_id)
    if mig["status"] in FLOW_ENDED:
        return
    if mig["migration_type"] != MigrationType.LIVE:
        _settle_move(db, mig, reason)
        return
    where = _guest_location(mig)
    instance_values = {}
    if where == "destination":
        db.move_instance(migration_id, mig["instance_uuid"], mig["source_host"],
                         mig["dest_host"])
        reason = "guest runs on the destination; " + reason
    elif where != "source":
        instance_values["vm_state"] = VmState.ERROR  # nobody knows: the operator must look
    db.finish_migration(migration_id, mig["instance_uuid"], status,
                        expected_statuses=[s for s in Status if s not in LIVE_TERMINAL],
                        instance_values=instance_values, error=reason)
    LOG.error("migration=%s left in error (guest on %s): %s", migration_id, where, reason)


def _settle_move(db, mig, reason):
    """A resize, cold migration or evacuation whose flow ended without its
    own bookkeeping (a revert stopped the rollback): the migration is
    ``error``, the instance ERROR for the operator to look at, the quota
    reservation released; claims stay as evidence of where resources are."""
    db.abandon_resize(mig["uuid"], mig["instance_uuid"], MoveStatus.ERROR,
                      expected_statuses=TRANSITIONAL, error=reason,
                      instance_values={"vm_state": VmState.ERROR})
    LOG.error("migration=%s type=%s left in error: %s", mig["uuid"],
              mig["migration_type"], reason)


def _guest_location(mig):
    """"source" or "destination" when the guest runs there and only there,
    else "unknown" (the hypervisors are asked, not the records)."""
    from migrateflow import drivers
    from migrateflow.states import PowerState
    drv = drivers.get_driver()
    try:
        running = [host for host in (mig["source_host"], mig["dest_host"]) if host and
                   (drv.get_guest(host, mig["instance_uuid"]) or {}).get("state")
                   == PowerState.RUNNING]
    except Exception:  # noqa: BLE001 - a host that cannot be asked: unknown
        return "unknown"
    if running == [mig["source_host"]]:
        return "source"
    if running == [mig["dest_host"]]:
        return "destination"
    return "unknown"


def flow_atoms(flow_uuid, factory=None):
    """[{name, kind, state, failure}] of the persisted atoms of a flow, in
    the order the flow built by ``factory`` runs them (else as persisted)."""
    with contextlib.closing(get_backend().get_connection()) as conn:
        detail = conn.get_flow_details(flow_uuid)
    if factory is None and detail.name in graph.OPERATIONS:
        factory = graph.OPERATIONS[detail.name].factory
    atoms = [{"name": ad.name,
              "kind": "retry" if isinstance(ad, tf_models.RetryDetail) else "task",
              "state": ad.state,
              "failure": ad.failure.exception_str if ad.failure else None}
             for ad in detail if not ad.name.startswith("_TaskFlow_")]
    if factory is not None:
        order = graph.execution_order(graph.describe(factory()))
        atoms.sort(key=lambda a: order.index(a["name"]) if a["name"] in order else len(order))
    return atoms


# -- jobboard: post a flow as a job, conductors run it ----------------------
def get_board(conf=CONF):
    """The connected ZooKeeper jobboard from ``[jobboard]`` (one per place)."""
    key = (",".join(conf.jobboard.hosts), conf.jobboard.path)
    backend = get_backend(conf)  # jobs load their logbook from it
    with _backends_lock:
        board = _boards.get(key)
        if board is None:
            board = job_backends.fetch(
                "migrateflow", {"board": "zookeeper", "hosts": key[0], "path": key[1],
                                "timeout": conf.jobboard.session_timeout,
                                "connection_retry": dict(_ZK_RECONNECT)},
                persistence=backend)
            board.connect()
            _boards[key] = board
    return board


def post(factory, store, migration_id, factory_args=()):
    """Persist the flow (rebuildable from ``factory``) and post it as a job.

    Returns the job's uuid; the migration record learns the flow and job.
    """
    backend = get_backend()
    book = _new_book(migration_id)
    flow = factory(*factory_args)
    flow_detail = p_utils.create_flow_detail(flow, book=book, backend=backend)
    taskflow.engines.save_factory_details(flow_detail, factory, list(factory_args), {},
                                          backend=backend)
    board = get_board()
    job = board.post(f"migration-{migration_id}", book=book, details={
        "store": {str(key): value for key, value in store.items()},
        "migration_id": migration_id, "flow_uuid": flow_detail.uuid})
    db_api.get_db().update_migration(migration_id, flow_uuid=flow_detail.uuid,
                                     job_uuid=job.uuid)
    LOG.info("job posted migration=%s job=%s", migration_id, job.uuid)
    return job.uuid


def repost(migration_id):
    """Post the persisted flow of a migration again (its job was lost);
    a conductor resumes it from its last finished step."""
    mig = db_api.get_db().get_migration(migration_id)
    backend = get_backend()
    with contextlib.closing(backend.get_connection()) as conn:
        book = conn.get_logbook(migration_id)
    job = get_board().post(f"migration-{migration_id}", book=book, details={
        "migration_id": migration_id, "flow_uuid": mig["flow_uuid"]})
    db_api.get_db().update_migration(migration_id, job_uuid=job.uuid)
    LOG.warning("job re-posted migration=%s job=%s", migration_id, job.uuid)
    return job.uuid


class MigrationConductor(nonblocking.NonBlockingConductor):
    """Claims migration jobs and runs them; resumes the ones a dead
    conductor left (its claim vanishes with its ZooKeeper session)."""

    def _listeners_from_job(self, job, engine):
        listeners = super()._listeners_from_job(job, engine)
        listeners.append(claims.CheckingClaimListener(engine, job, self._jobboard, self._name))
        migration_id = (job.details or {}).get("migration_id")
        if migration_id:
            listeners.append(flow_events.StepMirror(engine, migration_id))
        listeners.append(flow_events.FlowEvents(engine))
        return listeners

    def _dispatch_job(self, job):
        details = job.details or {}
        caller = details.get("store", {}).get("context") or {}
        try:
            with context.bind(request_id=caller.get("request_id"), context=caller,
                              migration_id=details.get("migration_id")):
                return self._run_job(job)
        except lifecycle.Detach:
            LOG.info("job=%s detached for another conductor", job.uuid)
            return False  # abandon: another conductor resumes it

    def _run_job(self, job):
        migration_id = (job.details or {}).get("migration_id")
        if migration_id:
            db_api.get_db().update_migration(migration_id, owner=process_id())
        flow_detail = self._flow_detail_from_job(job)
        if flow_detail.state in _FLOW_DONE:
            # finished before the last owner could consume it: running it
            # again would start the flow over from scratch
            LOG.info("job=%s already ended (%s): consuming", job.uuid, flow_detail.state)
            self._settle_ended(migration_id, flow_detail.state)
            return True
        consume = super()._dispatch_job(job)
        if consume and migration_id:
            state = self._flow_detail_from_job(job).state
            self._settle_ended(migration_id, state)
        return consume

    @staticmethod
    def _settle_ended(migration_id, flow_state):
        if migration_id and flow_state in (tf_states.FAILURE, tf_states.REVERTED):
            settle(migration_id, f"flow ended {flow_state} without finishing the migration")


def conductor_name(conf=CONF):
    return conf.jobboard.conductor_name or f"{socket.gethostname()}-{os.getpid()}"


def make_conductor(conf=CONF):
    return MigrationConductor(
        conductor_name(conf), get_board(conf), persistence=get_backend(conf), engine="serial",
        max_simultaneous_jobs=conf.jobboard.conductor_workers)
