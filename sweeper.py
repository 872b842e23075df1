"""No stuck migrations: find transitional migrations nobody is moving and
either resume them or finish them.

A migration is *stuck* when its status is transitional (queued, preparing,
running) and its record has not changed for ``[jobboard]/stuck_after``
seconds (a running flow touches it at every step that lasts, see
``flow_events.StepMirror``, and every poll of the copy).  What the sweeper
does depends on the facts, never on a guess:

* its flow already ended (SUCCESS, REVERTED, FAILURE) → settle the record;
* jobboard mode, its job is on the board → a conductor owns or will claim
  it: leave it (a dead owner's claim vanishes with its session);
* jobboard mode, no job → post the persisted flow again (resume);
* embedded mode, its recorded owner is a live process of this host (or
  this process runs it) → leave it: it is slow, not stuck;
* embedded mode otherwise → resume the flow in this process.
"""
import contextlib
import logging
import os
import socket
import time

from taskflow import exceptions as tf_exc
from taskflow import states as tf_states

from migrateflow import engine
from migrateflow.conf import CONF
from migrateflow.db import api as db_api
from migrateflow.states import TRANSITIONAL
from migrateflow.states import LiveMigrationStatus as Status

LOG = logging.getLogger(__name__)

_ENDED = (tf_states.SUCCESS, tf_states.REVERTED, tf_states.FAILURE)


def find_stuck(conf=CONF, now=None):
    """Transitional migrations untouched for longer than the bound."""
    bound = (now or time.time()) - conf.jobboard.stuck_after
    return [m for m in db_api.get_db(conf).list_migrations(statuses=TRANSITIONAL)
            if m["updated_at"] < bound]


def _flow_state(mig):
    if not mig["flow_uuid"]:
        return None
    try:
        with contextlib.closing(engine.get_backend().get_connection()) as conn:
            return conn.get_flow_details(mig["flow_uuid"]).state
    except tf_exc.NotFound:
        return None


def _jobs_on_board():
    return {job.uuid for job in engine.get_board().iterjobs(ensure_fresh=True)}


def sweep(conf=CONF, now=None):
    """Act on every stuck migration; returns [(migration uuid, action)]."""
    done = []
    stuck = find_stuck(conf, now)
    board_jobs = _jobs_on_board() if (stuck and conf.jobboard.enabled) else set()
    for mig in stuck:
        action = _sweep_one(conf, mig, board_jobs)
        LOG.warning("stuck migration=%s status=%s action=%s", mig["uuid"], mig["status"],
                    action)
        done.append((mig["uuid"], action))
    return done


def _sweep_one(conf, mig, board_jobs):
    state = _flow_state(mig)
    if state is None:
        # accepted but its flow was never persisted: nothing ran
        engine.settle(mig["uuid"], "no flow was ever started for this migration",
                      status=Status.FAILED)
        return "settled"
    if state in _ENDED:
        engine.settle(mig["uuid"], f"flow ended {state} without finishing the migration")
        return "settled"
    if conf.jobboard.enabled:
        if mig["job_uuid"] in board_jobs:
            return "owned"
        engine.repost(mig["uuid"])
        return "reposted"
    if _runs_elsewhere_on_this_host(mig["owner"]) or mig["uuid"] in engine.running_here():
        return "owned"  # slow, not stuck: its process is alive
    engine.resume(mig["uuid"])
    return "resumed"


def _runs_elsewhere_on_this_host(owner):
    """True when ``owner`` ("host:pid") is another live process of this
    host.  A process on another host cannot be asked: the age bound alone
    decides then."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
