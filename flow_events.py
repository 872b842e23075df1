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

from taskflow import exceptions as tf_exc
from taskflow import states as tf_states
from taskflow.listeners import base as listener_base

from migrateflow import context, graph, notifications
from migrateflow.db import api as db_api
from migrateflow.flows import (confirm_resize, evacuation, live_migration, resize,
                               revert_resize)
from migrateflow.keys import StoreKey

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


class StepMirror(listener_base.Listener):
    """Writes the atom being executed or reverted into the migration record."""

    def __init__(self, engine, migration_id):
        super().__init__(engine, task_listen_for=(tf_states.RUNNING, tf_states.REVERTING),
                         retry_listen_for=(), flow_listen_for=())
        self._migration_id = migration_id

    def _task_receiver(self, state, details):
        step = details["task_name"]
        if state == tf_states.REVERTING:
            step = "revert:" + step
        db_api.get_db().update_migration(self._migration_id, current_step=step)
