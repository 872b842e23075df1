"""Live migration, phase 3: copy the running guest and watch the copy.

The watch loop is the engine's, not the driver's, so every driver gets the
same progress records, downtime steps, completion timeout, operator abort
and force-complete, and, with ``[migration] live_migration_escalation``,
the convergence escalation (tasks/convergence.py: a copy that does not
converge gets the maximum downtime, then post-copy when permitted, instead
of waiting for the completion timeout).  A re-run after a crash looks at
the hypervisors first: a job still running is watched again, a guest
already on the destination is done; only when neither holds is a new job
started.

The copy may be gated: whoever limits how many copies run at once
(``hostops.drain_host``) registers a gate for the instance before asking
for its migration, and the step holds it from just before the copy starts
until the job ended.  As with Nova's ``_live_migration_semaphore``, which
leaves the conductor's checks outside, only the hypervisor work is gated:
the steps before and after it run beside other migrations' copies.
"""
import logging
import math
import time

from migrateflow import exceptions as exc
from migrateflow import lifecycle
from migrateflow.conf import CONF
from migrateflow.states import LiveMigrationStatus as Status
from migrateflow.states import PowerState
from migrateflow.tasks import base, convergence

_ACTIVE = [Status.PREPARING, Status.RUNNING]
#: seconds between two looks at an operator abort while waiting for a gate
GATE_POLL_S = 0.25
#: instance uuid -> gate: an object with acquire(timeout) -> bool, release()
_copy_gates = {}


def register_copy_gate(instance_uuid, gate):
    """Gate the next copies of ``instance_uuid`` in this process."""
    _copy_gates[instance_uuid] = gate


def unregister_copy_gate(instance_uuid):
    _copy_gates.pop(instance_uuid, None)


class PointOfNoReturn(exc.MigrateflowError):
    """Raised by a revert to stop a rollback: the guest already runs on the
    destination, and nothing may move it back."""


def data_gb(instance, block_migration):
    """Nova's sizing of timeouts: memory (plus disk for block migration),
    at least 2 GiB."""
    size = instance["memory_mb"] / 1024.0
    if block_migration and not instance["volume_backed"]:
        size += instance["disk_gb"]
    return max(2.0, size)


def downtime_steps(size_gb, conf=CONF):
    """(job seconds, max downtime ms) pairs, Nova's linear ramp."""
    opts = conf.migration
    delay = int(opts.live_migration_downtime_delay * size_gb)
    steps = opts.live_migration_downtime_steps
    base_ms = opts.live_migration_downtime / steps
    offset = (opts.live_migration_downtime - base_ms) / steps
    return [(delay * i, int(base_ms + offset * i)) for i in range(steps + 1)]


def guest_on_destination(driver, source, dest, instance_uuid):
    """True when the guest runs on ``dest`` and no longer runs on ``source``."""
    at_dest = driver.get_guest(dest, instance_uuid)
    at_source = driver.get_guest(source, instance_uuid)
    return (at_dest is not None and at_dest["state"] == PowerState.RUNNING
            and (at_source is None or at_source["state"] != PowerState.RUNNING))


class _Held:
    """The copy gate this step holds, if any: given back once, as soon as
    the copy ended.  Its thread is urgent from the wait for the gate on
    (so it comes back with a place, or to look at an abort every
    GATE_POLL_S, before the others) until it gives the gate back: when it
    takes turns with others, it runs before them, so the copies of the
    migrations waiting at the gate start as soon as this one ended
    (``lifecycle.Turns``)."""

    def __init__(self, gate):
        self._gate, self._held = gate, False

    def take(self, wait):
        if self._gate is not None:
            lifecycle.set_urgent(True)
            try:
                wait(self._gate)
            except BaseException:
                lifecycle.set_urgent(False)
                raise
            self._held = True

    def release(self):
        if self._held:
            self._held = False
            self._gate.release()
            lifecycle.set_urgent(False)


class LiveMigrate(base.MigrationTask):
    """live_migration: start (or re-attach to) the copy and watch it.

    Reverts by: aborting a job still running, so the guest keeps running on
    the source; if the guest already runs on the destination the rollback
    is stopped (PointOfNoReturn) and the migration is marked error there.
    """

    NAME = "live-migration"

    def execute(self, migration_id, instance_id, source_host, dest_host, migrate_data):
        drv = self.driver
        inst = self.instance(instance_id)
        size = data_gb(inst, migrate_data["block_migration"])
        steps = downtime_steps(size)
        # a re-run after a crash: a job still running (also in post-copy,
        # when the guest already runs on the destination) is watched again;
        # a finished move is only recorded
        job = drv.get_migration_job(source_host, inst)
        running = job is not None and job["status"] == "running"
        if not running and guest_on_destination(drv, source_host, dest_host, instance_id):
            if job is not None:
                self._record(migration_id, job)
            return self._summary(job)
        gate = _Held(_copy_gates.get(instance_id))
        gate.take(lambda g: self._wait_for(g, migration_id))
        try:
            mig = self.db.get_migration(migration_id)
            if mig["abort_requested"] and not running:
                raise exc.MigrationAborted(f"migration {migration_id} aborted before the copy")
            if not self.db.update_migration(migration_id, expected_statuses=_ACTIVE,
                                            status=Status.RUNNING):
                raise exc.InvalidMigrationState(
                    f"migration {migration_id} is {mig['status']}, cannot run")
            if not running:
                opts = CONF.migration
                drv.live_migration(source_host, inst, dest_host, migrate_data, {
                    "bandwidth_mbps": opts.live_migration_bandwidth,
                    "downtime_ms": steps[0][1],
                    "auto_converge": opts.live_migration_permit_auto_converge,
                    "post_copy": opts.live_migration_permit_post_copy,
                })
            job = self._watch(drv, migration_id, inst, source_host, size, steps,
                              copy_ended=gate.release)
            return self._summary(job)
        finally:
            gate.release()

    def _wait_for(self, gate, migration_id):
        """Take the gate; an operator abort or a stopping process ends the
        wait (the migration is still ``preparing``: nothing was copied)."""
        started = time.monotonic()
        while not gate.acquire(GATE_POLL_S):
            if self.db.get_migration(migration_id)["abort_requested"]:
                raise exc.MigrationAborted(
                    f"migration {migration_id} aborted while waiting to start the copy")
            if lifecycle.STOPPING.is_set():
                raise lifecycle.Detach()
        waited = time.monotonic() - started
        if waited >= GATE_POLL_S:
            self.log(logging.INFO, "copy gate taken", migration_id, waited=f"{waited:.2f}")

    def _watch(self, drv, migration_id, inst, source_host, size, steps, copy_ended):
        opts = CONF.migration
        timeout = opts.live_migration_completion_timeout * size
        next_step = 1
        forced = False
        ladder = self._ladder(migration_id, steps) if opts.live_migration_escalation else None
        while True:
            job = drv.get_migration_job(source_host, inst)
            if job is None:
                raise exc.DriverError(f"migration job of {inst['uuid']} vanished "
                                      f"from {source_host}")
            if job["status"] != "running":
                copy_ended()
            self._record(migration_id, job)
            if job["status"] == "completed":
                return job
            if job["status"] != "running":
                raise exc.DriverError(f"migration job {job['status']}: "
                                      f"{job.get('error') or 'no reason given'}")
            elapsed = job["time_elapsed"]
            while next_step < len(steps) and elapsed >= steps[next_step][0]:
                if ladder is None or not ladder.raised_downtime:
                    drv.live_migration_set_downtime(source_host, inst, steps[next_step][1])
                    if ladder is not None:
                        ladder.ramp_step(steps[next_step][1])
                next_step += 1
            if ladder is not None and not forced:
                forced = self._escalate(drv, migration_id, inst, source_host, ladder, job)
            mig = self.db.get_migration(migration_id)
            if mig["abort_requested"] and not job["post_copy"]:
                drv.live_migration_abort(source_host, inst)
                raise exc.MigrationAborted(f"migration {migration_id} aborted by operator")
            if mig["force_complete_requested"] and not forced:
                forced = True
                drv.live_migration_force_complete(source_host, inst)
            if timeout and elapsed > timeout and not forced:
                if opts.live_migration_timeout_action == "force_complete":
                    forced = True
                    drv.live_migration_force_complete(source_host, inst)
                elif not job["post_copy"]:
                    drv.live_migration_abort(source_host, inst)
                    raise exc.MigrationTimeout(
                        f"live migration did not complete within {timeout:.0f} s "
                        f"({opts.live_migration_completion_timeout} s/GiB × {size:.1f} GiB); "
                        "aborted, the guest stays on the source")
            if lifecycle.STOPPING.is_set():
                self.log(logging.INFO, "process stopping: the copy goes on, another "
                         "conductor re-attaches", migration_id)
                raise lifecycle.Detach()
            if opts.live_migration_poll_interval:
                drv.wait_for_migration_job(source_host, inst,
                                           opts.live_migration_poll_interval)

    def _ladder(self, migration_id, steps):
        """The escalation policy of this watch; a re-attached watch goes on
        from the rungs the migration record says were reached."""
        opts = CONF.migration
        note = self.db.get_migration(migration_id)["scheduler_notes"].get(
            convergence.NOTE_KEY)
        return convergence.Escalation(
            opts.live_migration_escalation_iterations, opts.live_migration_downtime,
            steps[0][1], opts.live_migration_permit_post_copy, note=note)

    def _escalate(self, drv, migration_id, inst, source_host, ladder, job):
        """Climb the ladder as far as this look at the job says; True once
        the job was switched to post-copy.  Each step is recorded before it
        is carried out: a crash in between must not hide that it was asked."""
        forced = False
        for step in ladder.observe(job):
            self.log(logging.WARNING, "copy not converging: escalation", migration_id,
                     rung=step.rung, outcome=step.outcome, iteration=step.iteration,
                     detail=repr(step.why))
            self.db.add_scheduler_note(migration_id, convergence.NOTE_KEY,
                                       ladder.taken(step))
            if step.outcome == convergence.APPLY and step.rung == convergence.DOWNTIME:
                drv.live_migration_set_downtime(source_host, inst, ladder.max_downtime_ms)
            elif step.outcome == convergence.APPLY and step.rung == convergence.POST_COPY:
                drv.live_migration_force_complete(source_host, inst)
                forced = True
        return forced

    def _record(self, migration_id, job):
        self.db.update_migration(
            migration_id,
            memory_total_mb=int(job["memory_total_mb"]),
            memory_processed_mb=int(job["memory_processed_mb"]),
            memory_remaining_mb=int(math.ceil(job["memory_remaining_mb"])),
            dirty_rate_mbps=float(job["dirty_rate_mbps"]),
            iteration=int(job["iteration"]),
            downtime_ms=job.get("downtime_ms"),
            post_copy=bool(job.get("post_copy")))

    @staticmethod
    def _summary(job):
        job = job or {}
        return {"downtime_ms": job.get("downtime_ms"), "iteration": job.get("iteration"),
                "time_elapsed": job.get("time_elapsed"), "post_copy": job.get("post_copy")}

    def revert(self, result, migration_id, instance_id, source_host, dest_host, **kwargs):
        drv = self.driver
        inst = self.instance(instance_id)
        if guest_on_destination(drv, source_host, dest_host, instance_id):
            self.log(logging.ERROR, "guest runs on the destination: rollback stopped",
                     migration_id, dest=dest_host)
            raise PointOfNoReturn(
                f"instance {instance_id} already runs on {dest_host}; not moving it back")
        # abort without looking at the job first: a look can be the poll that
        # completes the copy (found by the crash matrix); abort is a no-op
        # without a running job and refuses once the guest has moved
        try:
            drv.live_migration_abort(source_host, inst)
        except exc.InvalidMigrationState as err:
            raise PointOfNoReturn(
                f"instance {instance_id} cannot be brought back: {err}") from err
