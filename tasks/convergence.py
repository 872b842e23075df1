"""Convergence escalation of a live migration: the policy, no I/O.

The reference policy (Nova's) only raises the downtime on a fixed ramp and
waits for the completion timeout.  Here every look at the job is fed to
``Escalation.observe``; once ``patience`` copy iterations in a row did not
converge it answers with the next rung of the ladder:

1. ``max-downtime``: the configured maximum downtime at once (the ramp
   stops: it would lower it again); when even that cannot hold what a pass
   leaves dirty at the current bandwidth, the next rung follows at once;
2. ``auto-converge``: the hypervisor throttles the guest's vCPUs.  libvirt
   sets it only when a job starts (QEMU refuses to change migration
   capabilities while a migration runs), so this rung cannot switch it on:
   a job started with it is given time while the throttle still rises, a
   job without it skips the rung;
3. ``post-copy`` when permitted: the guest runs on the destination at once
   and pulls the rest.

An iteration converges when it shrank the memory left to copy by at least
MIN_PROGRESS and the guest dirties memory slower than (1 - MIN_PROGRESS)
times the rate it is sent at (faster, a pass cannot shrink it by as much).
Steps taken are kept as text (``describe``) so the migration record shows
them and a re-attached watcher does not climb the same rungs again.
"""
import dataclasses

DOWNTIME, AUTO_CONVERGE, POST_COPY = "max-downtime", "auto-converge", "post-copy"
LADDER = (DOWNTIME, AUTO_CONVERGE, POST_COPY)
#: an iteration that shrinks the memory left to copy by less than this fraction
#: does not converge (the fake hypervisor's own rule for auto-converge)
MIN_PROGRESS = 0.10
#: key of the escalation steps in the migration's notes (cannot be a host name)
NOTE_KEY = "live-migration escalation"
#: between two steps in the note
SEPARATOR = " | "
APPLY, ACTIVE, SKIP = "applied", "active", "skipped"
#: stay on the rung without a step (auto-converge still throttling harder)
WAIT = "wait"
#: auto-converge's highest vCPU throttle (QEMU's default max-cpu-throttle)
THROTTLE_MAX_PCT = 99


@dataclasses.dataclass(frozen=True)
class Step:
    """One rung reached: ``outcome`` is APPLY (the caller acts), ACTIVE
    (already working, given time) or SKIP (cannot help)."""

    rung: str
    outcome: str
    iteration: int
    elapsed_s: float
    why: str

    def describe(self):
        return (f"{self.rung} {self.outcome} at iteration {self.iteration} "
                f"({self.elapsed_s:.1f} s): {self.why}")


def rungs_in(note):
    """Rungs already reached according to a note of ``describe``s joined
    by SEPARATOR."""
    return {part.split(" ", 1)[0] for part in (note or "").split(SEPARATOR) if part}


class Escalation:
    """Decides, look by look, when a copy does not converge and what next."""

    def __init__(self, patience, max_downtime_ms, downtime_ms, post_copy_permitted,
                 note=None):
        """``note``: the steps an earlier watch of the same job took."""
        self.patience = patience
        self.max_downtime_ms = max_downtime_ms
        self.downtime_ms = downtime_ms
        self.post_copy_permitted = post_copy_permitted
        self.history = [part for part in (note or "").split(SEPARATOR) if part]
        done = rungs_in(note)
        self._rung = next((i for i, r in enumerate(LADDER) if r not in done), len(LADDER))
        self._stuck = 0
        self._iteration = None
        self._remaining = None
        self._sample = None          # (processed MiB, seconds) of the last look
        self._rate = None            # MiB/s sent between the last two looks
        self._throttle = 0

    def taken(self, step):
        """``step`` was carried out; returns the note of every step so far."""
        self.history.append(step.describe())
        return SEPARATOR.join(self.history)

    @property
    def exhausted(self):
        return self._rung >= len(LADDER)

    @property
    def raised_downtime(self):
        """The max-downtime rung was reached: the ramp must not lower it."""
        return self._rung > 0

    def ramp_step(self, downtime_ms):
        """The reference ramp set ``downtime_ms``."""
        self.downtime_ms = downtime_ms

    def observe(self, job):
        """One look at the running job; returns the Steps reached now."""
        self._measure(job)
        if self.exhausted or job.get("post_copy") or not self._new_iteration(job):
            return []
        if self._converges(job):
            self._stuck = 0
        else:
            self._stuck += 1
        self._remaining = job["memory_remaining_mb"]
        if self._stuck < self.patience:
            return []
        self._stuck = 0
        return self._climb(job)

    def _measure(self, job):
        sample = (job["memory_processed_mb"], job["time_elapsed"])
        if self._sample is not None and sample[1] > self._sample[1]:
            self._rate = (sample[0] - self._sample[0]) / (sample[1] - self._sample[1])
        self._sample = sample

    def _new_iteration(self, job):
        """The copy began a new pass since the last look.  A job being set
        up (iteration 0) has no figures yet; the first pass seen is only the
        baseline of the next."""
        iteration = job["iteration"]
        if iteration < 1:
            return False
        new = self._iteration is not None and iteration > self._iteration
        if self._iteration is None or new:
            self._iteration = iteration
            if self._remaining is None:
                self._remaining = job["memory_remaining_mb"]
                return False
        return new

    def bandwidth(self, job):
        """MiB/s the copy moves: the driver's figure, else measured."""
        return job.get("bandwidth_mbps") or self._rate

    def _converges(self, job):
        shrinks = job["memory_remaining_mb"] < self._remaining * (1.0 - MIN_PROGRESS)
        bandwidth = self.bandwidth(job)
        # at 90 % of the bandwidth a pass leaves 90 % dirty: MIN_PROGRESS again
        outpaced = bool(bandwidth) and \
            job["dirty_rate_mbps"] >= bandwidth * (1.0 - MIN_PROGRESS)
        return shrinks and not outpaced

    def _why(self, job):
        bandwidth = self.bandwidth(job)
        sent = f"{bandwidth:.0f}" if bandwidth else "?"
        return (f"{job['memory_remaining_mb']:.0f} MiB left, dirty "
                f"{job['dirty_rate_mbps']:.0f} MiB/s, sent {sent} MiB/s")

    def _climb(self, job):
        steps = []
        while not self.exhausted:
            rung = LADDER[self._rung]
            outcome, reason = self._outcome(rung, job)
            if outcome == WAIT:
                return steps
            if outcome is not None:
                steps.append(Step(rung, outcome, job["iteration"], job["time_elapsed"],
                                  f"{reason}; {self._why(job)}"))
            if outcome == ACTIVE:        # working: give it time, stay on the rung
                return steps
            self._rung += 1
            if outcome == APPLY and not self._hopeless(rung, job):
                return steps
        return steps

    def _hopeless(self, rung, job):
        """The downtime just raised still cannot hold what a pass leaves:
        no use waiting for it, climb on at once."""
        bandwidth = self.bandwidth(job)
        return (rung == DOWNTIME and bool(bandwidth)
                and job["memory_remaining_mb"] / bandwidth * 1000.0 > self.max_downtime_ms)

    def _outcome(self, rung, job):
        """(outcome, reason); outcome WAIT: stay on the rung without a step,
        None: leave it without one."""
        if rung == DOWNTIME:
            if (self.downtime_ms or 0) >= self.max_downtime_ms:
                return SKIP, f"downtime already {self.max_downtime_ms} ms"
            self.downtime_ms = self.max_downtime_ms
            return APPLY, f"downtime {self.max_downtime_ms} ms"
        if rung == AUTO_CONVERGE:
            throttle = job.get("throttle_pct") or 0
            rising, waited = throttle > self._throttle, self._throttle > 0
            self._throttle = max(throttle, self._throttle)
            if rising and throttle < THROTTLE_MAX_PCT:
                return (WAIT, "") if waited else (ACTIVE, f"throttle {throttle} %")
            if throttle:
                return None, ""          # at its limit and still not converging
            return SKIP, "not on for this job (libvirt sets it only when a job starts)"
        if self.post_copy_permitted:
            return APPLY, "switched to post-copy"
        return SKIP, "not permitted"
