"""What a running flow tells the world: the request and migration it works
for on every log line, the step it runs in its migration's record
(``StepMirror``), and the start / end / error of each of its phases as
notifications (``notifications``).

``FlowEvents`` is attached to every flow the engine runs (in-process, resumed,
or claimed by a conductor).  A phase starts when its first step starts and
ends when the next phase starts (the flows are linear), or with the flow.
The rollback starts with the first revert of a step outside a retried block
(TaskFlow persists and announces no REVERTING state of the flow itself; a
retried block's reverts are a retry, not the rollback).  A resumed flow does
not announce again what its first run announced: it starts from the phase and
rollback its persisted atoms show (TaskFlow does not announce RUNNING again
for the step a crash interrupted: it was RUNNING already), and finished
steps do not run again.
"""
import functools
import heapq
import itertools
import logging
import os
import threading
import time

from taskflow import exceptions as tf_exc
from taskflow import states as tf_states
from taskflow.listeners import base as listener_base

from migrateflow import context, graph, notifications
from migrateflow.db import api as db_api
from migrateflow.flows import (confirm_resize, evacuation, live_migration, resize,
                               revert_resize)
from migrateflow.keys import StoreKey

LOG = logging.getLogger(__name__)

#: flow name -> ([(phase, its first step)], rollback phase)
PHASES = {
    live_migration.NAME: ([("live_migration_check", "start-live-migration"),
                           ("live_migration_pre", "bind-destination-ports"),
                           ("live_migration", "live-migration"),
                           ("live_migration_post", "record-instance-on-destination")],
                          "live_migration_rollback"),
    resize.NAME: ([("resize_prep", "start-resize"),
                   ("resize", "migrate-disk-and-power-off"),
                   ("resize_finish", "connect-destination-volumes")], "resize_rollback"),
    confirm_resize.NAME: ([("resize_confirm", "start-confirm-resize")],
                          "resize_confirm_rollback"),
    revert_resize.NAME: ([("resize_revert", "start-revert-resize")],
                         "resize_revert_rollback"),
    evacuation.NAME: ([("evacuate", "start-evacuation"),
                       ("rebuild", "bind-ports-on-destination")], "evacuate_rollback"),
}

#: the step whose end ends a live migration's memory copy
_COPY_STEP = "live-migration"


@functools.cache
def phase_of_steps(flow_name):
    """{step name: phase} of the flow named ``flow_name``, in execution
    order (retry controllers included)."""
    phases, _rollback = PHASES[flow_name]
    firsts = dict((first, phase) for phase, first in phases)
    order = graph.execution_order(graph.describe(graph.OPERATIONS[flow_name].factory()))
    mapping, phase = {}, phases[0][0]
    for name in order:
        phase = firsts.get(name, phase)
        mapping[name] = phase
    return mapping


@functools.cache
def retried_steps(flow_name):
    """Steps inside a block that a retry controller runs again (their
    reverts may be a retry, not the rollback)."""
    found = set()

    def walk(block, inside):
        for child in block.children:
            if isinstance(child, graph.Block):
                walk(child, inside or child.retry is not None)
            elif inside:
                found.add(child.name)
    walk(graph.describe(graph.OPERATIONS[flow_name].factory()), False)
    return frozenset(found)


_UNDONE = (tf_states.REVERTING, tf_states.REVERTED, tf_states.REVERT_FAILURE)


def _error(failure):
    if failure is None:
        return None
    return {"type": next(iter(failure), "Exception"), "message": failure.exception_str}


def _fetch(storage, key):
    try:
        return storage.fetch(key)
    except tf_exc.NotFound:
        return None


def log_fields(engine):
    """The log fields of the flow ``engine`` runs: its request (id and
    caller, from the store) and its migration."""
    caller = _fetch(engine.storage, StoreKey.CONTEXT) or {}
    return {"request_id": caller.get("request_id"),
            "migration_id": _fetch(engine.storage, StoreKey.MIGRATION_ID),
            "context": caller}


class FlowEvents(listener_base.Listener):
    """Binds the log fields of the flow's request and migration while the
    flow runs, and sends its phase notifications."""

    def __init__(self, engine):
        super().__init__(
            engine,
            task_listen_for=(tf_states.RUNNING, tf_states.SUCCESS, tf_states.FAILURE,
                             tf_states.REVERTING, tf_states.REVERT_FAILURE),
            flow_listen_for=(tf_states.REVERTED, tf_states.SUCCESS, tf_states.FAILURE),
            retry_listen_for=(tf_states.REVERTING,))
        storage = engine.storage
        self._fields = log_fields(engine)
        self._migration_id, self._ctx = self._fields["migration_id"], self._fields["context"]
        self._bound = None
        self._phases = phase_of_steps(storage.flow_name) if storage.flow_name in PHASES \
            else None
        self._rollback = PHASES[storage.flow_name][1] if self._phases else None
        self._retried = retried_steps(storage.flow_name) if self._phases else frozenset()
        self._phase = self._last_step = self._failure = None
        self._rolling_back = False
        if self._phases and storage.get_flow_state() not in (None, tf_states.PENDING):
            self._recover(storage)

    def _recover(self, storage):
        """Where a resumed flow's first run stopped (nothing for a new one)."""
        states = storage.get_atoms_states(list(self._phases))
        for name in self._phases:  # execution order
            state = states[name][0]
            if state in (tf_states.RUNNING, tf_states.SUCCESS, tf_states.FAILURE):
                self._phase, self._last_step = self._phases[name], name
            if state in _UNDONE and name not in self._retried:
                self._rolling_back = True

    # -- the flow's lifetime ------------------------------------------------------------
    def register(self):
        super().register()
        self._bound = context.bind(**self._fields)
        self._bound.__enter__()

    def deregister(self):
        super().deregister()
        if self._bound is not None:
            bound, self._bound = self._bound, None
            bound.__exit__(None, None, None)

    # -- notifications --------------------------------------------------------------------
    def _send(self, phase, stage, step=None, error=None):
        if not notifications.active():
            return
        mig = db_api.get_db().get_migration(self._migration_id)
        notifications.instance_action(phase, stage, mig, step=step, error=error,
                                      ctx=self._ctx)
        return mig

    def _task_receiver(self, state, details):
        if self._phases is None:
            return
        name = details["task_name"]
        if state == tf_states.RUNNING:
            phase = self._phases.get(name)
            if phase is not None and phase != self._phase:
                if self._phase is not None:
                    self._send(self._phase, "end", step=self._last_step)
                self._send(phase, "start", step=name)
            self._phase = phase or self._phase
        elif state == tf_states.SUCCESS:
            self._last_step = name
            if name == _COPY_STEP and notifications.active():
                mig = db_api.get_db().get_migration(self._migration_id)
                if mig["force_complete_requested"]:
                    notifications.instance_action("live_migration_force_complete", "end",
                                                  mig, step=name, ctx=self._ctx)
        elif state == tf_states.REVERTING:
            if name not in self._retried:
                self._rollback_starts()
        else:  # FAILURE, REVERT_FAILURE: kept for the error event
            self._failure = (name, details.get("result"))

    def _retry_receiver(self, state, details):
        if self._phases is not None:  # REVERTING: the retries are exhausted
            self._rollback_starts()

    def _failed(self):
        step, failure = self._failure or (None, None)
        error = _error(failure) if failure is not None and hasattr(
            failure, "exception_str") else None
        return step, error

    def _rollback_starts(self):
        if not self._rolling_back:
            self._rolling_back = True
            step, error = self._failed()
            self._send(self._phase, "error", step=step, error=error)
            self._send(self._rollback, "start", step=step)

    def _flow_receiver(self, state, details):
        if self._phases is None:
            return
        step, error = self._failed()
        if state == tf_states.REVERTED:
            mig = self._send(self._rollback, "end")
            if mig is not None and mig["abort_requested"]:
                notifications.instance_action("live_migration_abort", "end", mig,
                                              ctx=self._ctx)
        elif state == tf_states.FAILURE:
            self._send(self._rollback if self._rolling_back else self._phase, "error",
                       step=step, error=error)
        elif state == tf_states.SUCCESS and self._phase is not None:
            mig = db_api.get_db().get_migration(self._migration_id) \
                if notifications.active() else None
            if mig is not None and mig["error"]:  # ended, but a post step failed
                notifications.instance_action(self._phase, "error", mig,
                                              step=mig["failed_step"] or self._last_step,
                                              error={"type": "MigrationError",
                                                     "message": mig["error"]},
                                              ctx=self._ctx)
            elif mig is not None:
                notifications.instance_action(self._phase, "end", mig,
                                              step=self._last_step, ctx=self._ctx)


#: a step goes into its migration's record once it has run this long
#: (seconds): the record tells what a migration waits for, without a write
#: for each of the many steps that end in a moment
STEP_RECORD_DELAY_S = 0.05


class StepMirror(listener_base.Listener):
    """Writes the atom being executed or reverted into the migration record
    (``current_step``): the first of each run and every revert at once, a
    step executed once it ran ``STEP_RECORD_DELAY_S`` (by then another may
    run: the latest goes in).  Those late writes happen only while the
    record holds what this mirror wrote last, so a step that ended the
    migration (current_step None) is never overwritten; the run's end
    drops what was not written yet."""

    def __init__(self, engine, migration_id):
        super().__init__(engine, task_listen_for=(tf_states.RUNNING, tf_states.REVERTING),
                         retry_listen_for=(), flow_listen_for=())
        self._migration_id = migration_id
        self._db = db_api.get_db()
        self._lock = threading.Lock()
        self._recorded = None   # what this mirror wrote last (None: nothing yet)
        self._pending = None    # the step to write when due
        self._due = False       # a late write is queued
        self._closed = False

    def _task_receiver(self, state, details):
        step = details["task_name"]
        if state == tf_states.RUNNING and self._recorded is not None:
            with self._lock:
                self._pending = step
                if self._due:
                    return
                self._due = True
            _LATE.add(time.monotonic() + STEP_RECORD_DELAY_S, self)
            return
        if state == tf_states.REVERTING:
            step = "revert:" + step
        with self._lock:
            self._pending = None
            self._db.update_migration(self._migration_id, current_step=step)
            self._recorded = step

    def write_late(self):
        """The step pending since its time came (the late writes' thread).
        The write runs outside the lock: a flow thread taking turns
        (``lifecycle.Turns``) must never wait here for a thread that waits
        for a database lock."""
        with self._lock:
            step, self._pending, self._due = self._pending, None, False
            expected = self._recorded
            if self._closed or step is None or step == expected:
                return
        changed = self._db.replace_current_step(self._migration_id, expected, step)
        with self._lock:
            if self._recorded != expected:  # a revert was written meanwhile: it stands
                return
            if changed:
                self._recorded = step
            else:  # someone else moved the record on (the migration ended): leave it
                self._closed = True

    def deregister(self):
        with self._lock:
            self._closed, self._pending = True, None
        super().deregister()


class _LateWrites:
    """The steps to write when their time comes, by one thread of this
    process that ends when none is left (a drain forks its workers from a
    process running no other thread)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue = []  # heap of (due, sequence, mirror)
        self._seq = itertools.count()
        self._thread = None

    def add(self, due, mirror):
        with self._cond:
            heapq.heappush(self._queue, (due, next(self._seq), mirror))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="step-mirror",
                                                daemon=True)
                self._thread.start()
            elif self._queue[0][2] is mirror:
                self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while self._queue and self._queue[0][0] > time.monotonic():
                    self._cond.wait(self._queue[0][0] - time.monotonic())
                if not self._queue:
                    self._thread = None
                    return
                mirror = heapq.heappop(self._queue)[2]
            try:
                mirror.write_late()
            except Exception:  # noqa: BLE001 - the next step's write comes
                LOG.warning("recording the step of migration=%s failed",
                            mirror._migration_id, exc_info=True)

    def idle(self, timeout=1.0):
        """Wait until nothing is queued and the thread ended; True if so."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                thread = self._thread
            if thread is None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            thread.join(remaining)  # it ends once the queue is empty


_LATE = _LateWrites()


def _after_fork_in_child():
    global _LATE
    _LATE = _LateWrites()  # the parent's thread and mirrors stayed behind


os.register_at_fork(after_in_child=_after_fork_in_child)


def late_writes_idle(timeout=1.0):
    """True once no step waits to be written and the writing thread ended."""
    return _LATE.idle(timeout)
