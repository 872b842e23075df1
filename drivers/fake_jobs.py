"""The fake hypervisor's live-migration jobs: a row per instance holding
the state of a deterministic pre-copy / post-copy simulation (one
iteration per poll), with auto-converge and the switch-over to the
destination.  The simulation is pure arithmetic on a JSON-able dict, so a
run is deterministic whatever the wall clock does."""
import json

from migrateflow import exceptions
from migrateflow.drivers import base
from migrateflow.drivers import fake_model as model

#: What the stop-and-copy phase costs on top of moving the last dirty pages
#: (pausing the vCPUs, device state, resuming on the destination).
SWITCHOVER_MS = 5.0
AUTO_CONVERGE_START = 0.20
AUTO_CONVERGE_STEP = 0.10
AUTO_CONVERGE_MAX = 0.99
#: An iteration that shrinks the dirty memory by less than this is "stuck".
MIN_PROGRESS = 0.10
DEFAULT_DOWNTIME_MS = 500.0


# -- migration jobs: a row per instance with its simulation state (JSON) --

def job_of(db, source, uuid):
    """(row, simulation) of the instance's job from ``source``, or (None, None)."""
    row = db.execute("SELECT * FROM jobs WHERE instance = ? AND source = ?",
                     (uuid, source)).fetchone()
    return (row, json.loads(row["sim"])) if row else (None, None)


def running_job(db, source, uuid):
    row, sim = job_of(db, source, uuid)
    if row is None or row["status"] != "running":
        raise exceptions.InvalidMigrationState(
            f"no running migration of instance {uuid} from {source}")
    return row, sim


def save_job(db, row, sim, status=None, error=None):
    db.execute("UPDATE jobs SET sim = ?, status = ?, error = ? WHERE instance = ?",
               (json.dumps(sim), status or row["status"], error, row["instance"]))


def end_job(db, row, sim, status, error=None):
    """On success the destination copy takes over (persistent there, source
    undefined); otherwise the incoming guest goes and the source runs on."""
    uuid, source, dest = row["instance"], row["source"], row["dest"]
    if status == "completed":
        model.set_guest(db, dest, uuid, state=model.RUNNING, persistent=1)
        model.remove_guest(db, source, uuid)
    else:
        model.remove_guest(db, dest, uuid)
        model.set_guest(db, source, uuid, state=model.RUNNING)
    save_job(db, row, sim, status, error)
    model.record_event(db, f"migration.{status}", source, uuid)


def advance_job(db, row, sim):
    """One poll's worth of progress; returns the simulated seconds it took.
    Before the post-copy switch a lost guest or destination fails the job."""
    uuid, source, dest = row["instance"], row["source"], row["dest"]
    source_guest = model.get_guest(db, source, uuid)
    if not sim["post_copy"]:
        dest_host = db.execute("SELECT up FROM hosts WHERE name = ?", (dest,)).fetchone()
        lost = ((source_guest is None and "the source guest vanished")
                or (model.get_guest(db, dest, uuid) is None and "the incoming guest vanished")
                or (not (dest_host and dest_host["up"]) and f"host {dest} is unreachable"))
        if lost:
            end_job(db, row, sim, "failed", lost)
            return 0.0
    running = source_guest is not None and source_guest["state"] == model.RUNNING
    duration, finished = advance(sim, source_guest["dirty_rate_mbps"] if running else 0.0)
    if finished:
        end_job(db, row, sim, "completed")
    else:
        save_job(db, row, sim)
    return duration


# -- the pre-copy / post-copy simulation ---------------------------------------

def new_simulation(memory_mb, bandwidth_mbps, params):
    """State of a job that has not copied anything yet."""
    downtime = params.get("downtime_ms")
    downtime = DEFAULT_DOWNTIME_MS if downtime is None else downtime
    return {
        "memory_total_mb": float(memory_mb), "memory_remaining_mb": float(memory_mb),
        "memory_processed_mb": 0.0, "iteration": 0, "time_elapsed": 0.0,
        "downtime_limit_ms": float(downtime), "bandwidth_mbps": float(bandwidth_mbps),
        "auto_converge": bool(params.get("auto_converge")),
        "post_copy_permitted": bool(params.get("post_copy")),
        "post_copy": False, "throttle": 0.0, "dirty_rate_mbps": 0.0,
        "downtime_ms": None,
    }


def advance(sim, dirty_rate_mbps):
    """Run one iteration of the job in ``sim`` (mutated).

    ``dirty_rate_mbps`` is how fast the source guest dirties memory now (0
    while it is paused).  Returns (simulated seconds it took, finished).
    """
    bandwidth = sim["bandwidth_mbps"]
    remaining = sim["memory_remaining_mb"]
    if sim["post_copy"]:
        return _final_copy(sim, SWITCHOVER_MS), True
    if remaining * 1000.0 / bandwidth <= sim["downtime_limit_ms"]:
        return _final_copy(sim, remaining * 1000.0 / bandwidth + SWITCHOVER_MS), True
    duration = remaining / bandwidth
    effective_rate = dirty_rate_mbps * (1.0 - sim["throttle"])
    dirtied = min(sim["memory_total_mb"], effective_rate * duration)
    if sim["auto_converge"] and dirtied > remaining * (1.0 - MIN_PROGRESS):
        sim["throttle"] = _next_throttle(sim["throttle"])
    sim.update(memory_remaining_mb=dirtied, dirty_rate_mbps=effective_rate,
               memory_processed_mb=sim["memory_processed_mb"] + remaining,
               iteration=sim["iteration"] + 1,
               time_elapsed=sim["time_elapsed"] + duration)
    return duration, False


def _next_throttle(throttle):
    if throttle == 0.0:
        return AUTO_CONVERGE_START
    return min(AUTO_CONVERGE_MAX, round(throttle + AUTO_CONVERGE_STEP, 2))


def _final_copy(sim, downtime_ms):
    """Copy what is left with the guest stopped (or, in post-copy, pulled
    by the running destination); the job is then done."""
    remaining = sim["memory_remaining_mb"]
    duration = remaining / sim["bandwidth_mbps"]
    sim.update(memory_remaining_mb=0.0, dirty_rate_mbps=0.0, downtime_ms=downtime_ms,
               memory_processed_mb=sim["memory_processed_mb"] + remaining,
               iteration=sim["iteration"] + 1,
               time_elapsed=sim["time_elapsed"] + duration)
    return duration


def job_view(sim, status, error):
    """The MigrationJob a caller sees."""
    return base.MigrationJob(
        status=status,
        memory_total_mb=sim["memory_total_mb"],
        memory_processed_mb=sim["memory_processed_mb"],
        memory_remaining_mb=sim["memory_remaining_mb"],
        dirty_rate_mbps=sim["dirty_rate_mbps"],
        iteration=sim["iteration"],
        time_elapsed=sim["time_elapsed"],
        downtime_ms=sim["downtime_ms"],
        post_copy=sim["post_copy"],
        throttle_pct=int(round(sim["throttle"] * 100)),
        error=error,
    )
