"""Operations on a whole host: drain (live-migrate everything off it).

Concurrency, as Nova limits it: at most ``per_host_limit`` copies at once
per source host (``max_concurrent_live_migrations``) and ``global_limit``
across every drain of this process (``max_concurrent_migrations_global``);
0 means unlimited.  Both are semaphores shared by the drains of this
process and their workers (while one is in use, a drain asking for another
limit gets the one in force).  They gate the copy, not the flow: the
live-migration step holds the instance's gate from just before the copy
starts until it ended (``tasks.live_migrate``), as Nova's
``_live_migration_semaphore`` leaves the conductor's checks outside, so the
checks and preparation of the next migrations and the post steps of the
last ones run beside the copies (twice as many workers as places keep the
next ones waiting at the gate).  With ``[jobboard] enabled`` conductors run
the flows, out of the gates' reach: the whole migration is gated there.
What cannot move live (not active and running, refused, or rolled back) is
reported, or with ``cold_fallback`` cold-migrated (``MigrationAPI.migrate``)
and confirmed (``MigrationAPI.confirm_resize``), that whole move gated.

With worker processes over the embedded SQLite files, the threads of each
worker take turns (``lifecycle.Turns``): one runs its flow until it waits
(the copy, a gate, a hypervisor daemon, another thread's write), and the
next runs, rather than all of them trading the GIL at every SQLite call.
"""
import concurrent.futures
import contextlib
import datetime
import gc
import logging
import math
import multiprocessing
import queue
import threading
import time

from migrateflow import exceptions as exc
from migrateflow import flow_events, lifecycle
from migrateflow import scheduler
from migrateflow.states import LiveMigrationStatus, MoveStatus
from migrateflow.tasks import live_migrate

LOG = logging.getLogger(__name__)

#: workers of a drain whose copies are not limited
MAX_UNLIMITED_WORKERS = 64
#: worker processes are forked from this process when it runs no other thread
#: (at once, warm: engine, db.engine, db.sqlite renew pools and locks in the
#: child), else from a fork server (another thread may hold a lock the child
#: needs: SQLite's own, say); gates and queues are of the server's kind
_FORK, _SERVER = multiprocessing.get_context("fork"), multiprocessing.get_context("forkserver")


class _Limit:
    """``limit`` places (0: unlimited, no semaphore) and the drains using it."""

    def __init__(self, limit):
        self.limit, self.users = limit, 0
        self.semaphore = _SERVER.BoundedSemaphore(limit) if limit else None


_gates_lock = threading.Lock()
_gates = {}  # source host (None: the global gate) -> _Limit, while a drain uses it


def _enter_gates(host, per_host, global_limit):
    """The shared limits (source host's, global) for a drain of ``host``."""
    with _gates_lock:
        for key, limit in ((host, per_host), (None, global_limit)):
            gate = _gates.get(key) or _gates.setdefault(key, _Limit(limit))
            if gate.limit != limit:
                LOG.warning("drain limit ignored gate=%s asked=%s in_force=%s",
                            key or "global", limit or "unlimited", gate.limit or "unlimited")
            gate.users += 1
        return _gates[host], _gates[None]


def _leave_gates(host, gates):
    with _gates_lock:
        for key, gate in zip((host, None), gates):
            gate.users -= 1
            if not gate.users:
                del _gates[key]


class Gate:
    """The semaphores a copy needs, the source host's then the global one
    (always in that order: nobody holding the second waits for the first),
    taken all or none.  A thread that takes turns (``lifecycle.Turns``)
    gives its turn away while it waits here."""

    def __init__(self, gates):
        self._semaphores = [gate.semaphore for gate in gates if gate.semaphore is not None]

    def acquire(self, timeout=None):
        if self._take(0):
            return True
        if timeout == 0:
            return False
        with lifecycle.waiting():
            return self._take(timeout)

    def _take(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, semaphore in enumerate(self._semaphores):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not semaphore.acquire(timeout=left):
                for held in self._semaphores[:i]:
                    held.release()
                return False
        return True

    def release(self):
        for semaphore in reversed(self._semaphores):
            semaphore.release()


def _count(value, default, name):
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise exc.InvalidRequest(f"{name} must be a whole number >= 0, not {value!r}")
    return value


def drain_host(api, host, *, per_host_limit=None, global_limit=None, cold_fallback=False,
               progress=None, processes=1):
    """Disable ``host`` (it stays so) and move every instance off it through
    ``api.live_migrate`` (for ``api.context``, the drain's caller).
    Limits: copies at once (None: configured; 0: unlimited).
    ``progress(done, total, result)`` follows each instance.
    ``processes`` > 1: the workers are split between that many processes,
    to use more CPUs (the API's listeners then run there).  Returns {host,
    total, succeeded, failed, results: [{instance, name, method ("live",
    "cold" or None), migration, status, error}]} in the host's instance
    order (status ``refused``: nothing started).  A malformed or unknown
    host or a bad count raises before anything changed."""
    scheduler.validate_host_name(host)
    api.db.get_host(host)
    conf = api.conf
    per_host = _count(per_host_limit, conf.max_concurrent_live_migrations, "per_host_limit")
    global_ = _count(global_limit, conf.max_concurrent_migrations_global, "global_limit")
    processes = 1 if conf.jobboard.enabled else _count(processes, 1, "processes")
    started = time.monotonic()
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    api.db.update_host(host, disabled=True, disabled_reason=f"draining since {since}")
    instances = api.db.list_instances(host=host)
    limits = [n for n in (per_host, global_) if n]
    workers = max(1, min(len(instances), 2 * min(limits) if limits
                         else MAX_UNLIMITED_WORKERS))
    processes = max(1, min(processes, workers))
    LOG.info("drain started host=%s instances=%d per_host_limit=%s global_limit=%s "
             "cold_fallback=%s workers=%d processes=%d", host, len(instances), per_host,
             global_, cold_fallback, workers, processes)
    gates = _enter_gates(host, per_host, global_)
    results = {}
    try:
        for result in _run(api, instances, Gate(gates), cold_fallback, host, processes,
                           math.ceil(workers / processes)):
            results[result["instance"]] = result
            LOG.log(logging.INFO if result["error"] is None else logging.WARNING,
                    "drain result host=%s instance=%s name=%s method=%s migration=%s "
                    "status=%s error=%r", host, *result.values())
            try:
                if progress is not None:
                    progress(len(results), len(instances), result)
            except Exception:  # noqa: BLE001 - the migrations go on regardless
                LOG.exception("drain progress callback failed host=%s", host)
    finally:
        _leave_gates(host, gates)
    ordered = [results[inst["uuid"]] for inst in instances]
    succeeded = sum(r["error"] is None for r in ordered)
    LOG.info("drain finished host=%s total=%d succeeded=%d failed=%d seconds=%.1f",
             host, len(ordered), succeeded, len(ordered) - succeeded,
             time.monotonic() - started)
    return {"host": host, "total": len(ordered), "succeeded": succeeded,
            "failed": len(ordered) - succeeded, "results": ordered}


def _run(api, instances, gate, cold_fallback, host, processes, threads):
    """Yield each instance's result: ``processes`` workers (a thread here
    when 1), ``threads`` instances at once in each, take instances from one
    queue (the faster take more).  An instance whose worker died gets that
    as its error (its migration is left to the sweeper)."""
    if processes == 1:
        jobs, done, spawn, spec = queue.Queue(), queue.Queue(), threading.Thread, api
    else:
        jobs, done = _SERVER.Queue(), _SERVER.Queue()
        # the thread writing steps late ends in a moment once flows ended
        if threading.active_count() <= 2 and flow_events.late_writes_idle() and \
                threading.active_count() == 1:
            spawn, spec = _FORK.Process, api
        else:
            _SERVER.set_forkserver_preload(["migrateflow.api", "migrateflow.db.migration"])
            spawn, spec = _SERVER.Process, (_settings(api.conf), api.listeners,
                                            api.context and api.context.to_store())
    turns = processes > 1 and threads > 1 and _local_files(api.conf)
    workers = [spawn(target=_worker, name=f"drain-{host}-{i}", daemon=True,
                     args=(spec, gate, cold_fallback, threads, jobs, done, turns))
               for i in range(processes)]
    for worker in workers:  # before the queues start their threads here
        worker.start()
    for item in [*instances, *[None] * processes]:
        jobs.put(item)
    waiting = {inst["uuid"]: inst for inst in instances}
    while waiting:
        try:
            result = done.get(timeout=1.0)
        except queue.Empty:
            if any(worker.is_alive() for worker in workers):
                continue
            try:  # the last results may still be in the pipe
                result = done.get(timeout=1.0)
            except queue.Empty:
                break
        waiting.pop(result["instance"], None)
        yield result
    for worker in workers:
        worker.join()
    for pipe in (jobs, done) if processes > 1 else ():
        pipe.close()
        pipe.join_thread()
    for inst in waiting.values():
        yield _result(inst, error="the worker running its migration exited")


def _local_files(conf):
    """True when the state database and the flow persistence are SQLite
    files and the flows run here: a worker process's migration threads then
    take turns (``lifecycle.Turns``), each running until it waits for the
    copy, a gate or a hypervisor daemon.  With a database server, or flows
    run by the jobboard's conductors, they run freely: their waits on the
    server overlap."""
    from migrateflow import engine
    from migrateflow.db import api as db_api
    if conf.jobboard.enabled:
        return False
    urls = [db_api.get_db(conf).url]
    if conf.persistence.backend == "sql":
        urls.append(engine.persistence_url(conf))
    elif conf.persistence.backend != "memory":
        return False
    return all(str(url).startswith("sqlite:") for url in urls)


def _settings(conf):
    """Every option's value, for a worker process started by the server."""
    from migrateflow.conf import list_opts
    return [(g, opt.dest, (conf if g == "DEFAULT" else conf[g])[opt.dest])
            for g, opts in ((getattr(g, "name", g), o) for g, o in list_opts()) for opt in opts]


def _worker(spec, gate, cold_fallback, threads, jobs, done, turns=False):
    """``threads`` instances at once from ``jobs`` until None, each result
    to ``done``.  ``spec``: the API, or the settings and listeners to build
    it from (a fork server's child).  ``turns``: the threads take turns."""
    if isinstance(spec, tuple):
        from migrateflow import api as mf_api
        from migrateflow import context
        from migrateflow.conf import CONF
        for group, name, value in spec[0]:
            CONF.set_override(name, value, group=None if group == "DEFAULT" else group)
        spec = mf_api.MigrationAPI(CONF, spec[1], spec[2] and
                                   context.RequestContext.from_store(spec[2]))
    if threading.current_thread() is threading.main_thread():  # a process of its own
        _collect_less()
    free = threading.Semaphore(threads)

    def finished(future, inst):
        try:
            done.put(future.result())
        except BaseException as err:  # noqa: BLE001 - the drain must hear of it
            done.put(_result(inst, error=f"{type(err).__name__}: {err}"))
        free.release()

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        while free.acquire() and (inst := jobs.get()) is not None:
            future = pool.submit(_drain_one, spec, inst, gate, cold_fallback, turns)
            future.add_done_callback(lambda f, inst=inst: finished(f, inst))


#: young objects between two collections of a worker's first generation
#: (Python's default: 700)
WORKER_GC_THRESHOLD = 10_000


def _collect_less():
    """A worker process's cyclic garbage collector leaves alone what the
    process started with (modules, the parent's objects: alive for good,
    and left unwritten after a fork) and looks at young objects less often:
    each flow's engine makes and drops thousands of them.  Measured in row
    (c) of bench/bench_drain.py: 1.1-1.5 s of collections per worker
    process before, 0.3-0.6 s after (about 1 CPU ms per migration)."""
    gc.freeze()
    gc.set_threshold(WORKER_GC_THRESHOLD, *gc.get_threshold()[1:])


def _result(inst, **values):
    return {"instance": inst["uuid"], "name": inst["name"], "method": None,
            "migration": None, "status": "refused", "error": None, **values}


def _drain_one(api, inst, gate, cold_fallback, turns=False):
    result = _result(inst)
    with lifecycle.TURNS.take() if turns else contextlib.nullcontext():
        _move(api, inst, gate, cold_fallback, result)
    return result


def _move(api, inst, gate, cold_fallback, result):
    try:
        reason = _live(api, inst, gate, result)
        if reason is not None and cold_fallback:
            _cold(api, inst, gate, result, reason)
        elif reason is not None:
            result["error"] = reason
    except Exception as err:  # noqa: BLE001 - reported per instance
        LOG.exception("drain of instance=%s failed", inst["uuid"])
        result["error"] = f"{type(err).__name__}: {err}"


def _live(api, inst, gate, result):
    """Live-migrate: None once done (or ended so that nothing else may be
    tried), else why it cannot move live (it is still where it was)."""
    try:
        scheduler.check_live_migratable(inst)
    except exc.InstanceInvalidState as err:
        return err.message
    whole_flow = api.conf.jobboard.enabled
    if whole_flow:
        gate.acquire()
    else:
        live_migrate.register_copy_gate(inst["uuid"], gate)
    try:
        mig = api.live_migrate(inst["uuid"], wait=True)
    except exc.InvalidRequest as err:  # refused: nothing changed
        return err.message
    finally:
        if whole_flow:
            gate.release()
        else:
            live_migrate.unregister_copy_gate(inst["uuid"])
    result.update(method="live", migration=mig["uuid"], status=mig["status"],
                  error=mig["error"])
    if mig["status"] == LiveMigrationStatus.FAILED:  # rolled back: still on the source
        return mig["error"] or "live migration failed"
    result["error"] = None if mig["status"] == LiveMigrationStatus.COMPLETED else (
        mig["error"] or f"live migration ended {mig['status']}")
    return None


def _cold(api, inst, gate, result, reason):
    """Cold-migrate, then confirm; the whole move holds the gate."""
    gate.acquire()
    try:
        mig = api.migrate(inst["uuid"], wait=True)
        result.update(method="cold", migration=mig["uuid"], status=mig["status"],
                      error=mig["error"])
        if mig["status"] == MoveStatus.FINISHED:
            mig = api.confirm_resize(mig["uuid"], wait=True)
            result.update(status=mig["status"], error=mig["error"])
        if mig["status"] != MoveStatus.CONFIRMED:
            result["error"] = mig["error"] or f"cold migration ended {mig['status']}"
    except exc.InvalidRequest as err:  # refused: nothing changed
        result["error"] = f"{reason}; cold migration refused: {err.message}"
    finally:
        gate.release()
