"""[migration] options: how a live migration is run and watched.

Names and defaults are Nova's (there under [libvirt]); they live in their own
group here because the engine's monitor applies them for every driver.
"""
from oslo_config import cfg

GROUP = cfg.OptGroup("migration", title="Live migration behaviour")

OPTS = [
    cfg.IntOpt("live_migration_completion_timeout", default=800, min=0,
               help="Seconds per GiB of guest memory (and disk, for block "
                    "migration) to wait for the copy to finish before the "
                    "timeout action; 0 waits forever."),
    cfg.StrOpt("live_migration_timeout_action", default="abort",
               choices=["abort", "force_complete"],
               help="What to do when the completion timeout elapses."),
    cfg.BoolOpt("live_migration_permit_post_copy", default=False,
                help="Allow switching a running migration to post-copy."),
    cfg.BoolOpt("live_migration_permit_auto_converge", default=False,
                help="Allow CPU throttling so a busy guest can converge."),
    cfg.IntOpt("live_migration_downtime", default=500, min=100,
               help="Maximum permitted downtime in milliseconds."),
    cfg.IntOpt("live_migration_downtime_steps", default=10, min=3,
               help="Number of increments to reach the maximum downtime."),
    cfg.IntOpt("live_migration_downtime_delay", default=75, min=3,
               help="Seconds per GiB of memory between downtime increments."),
    cfg.IntOpt("live_migration_bandwidth", default=0, min=0,
               help="Maximum bandwidth in MiB/s; 0 means the hypervisor's "
                    "default."),
    cfg.BoolOpt("live_migration_escalation", default=True,
                help="Watch the copy for non-convergence (dirty rate at or "
                     "above the transfer rate, memory left to copy not "
                     "shrinking) and escalate step by step: the maximum "
                     "downtime at once, then auto-converge (only if the job "
                     "was started with it: libvirt cannot switch it on during "
                     "a job), then post-copy when permitted; the completion "
                     "timeout stays the backstop.  False: the reference "
                     "policy (Nova's downtime ramp, completion timeout, "
                     "timeout action)."),
    cfg.IntOpt("live_migration_escalation_iterations", default=3, min=1,
               help="Consecutive copy iterations that do not converge before "
                    "the next escalation step."),
    cfg.FloatOpt("live_migration_poll_interval", default=0.5, min=0,
                 help="Seconds between two looks at a running migration job."),
    cfg.IntOpt("post_migration_attempts", default=3, min=1,
               help="Attempts of each step after the guest runs on the "
                    "destination before the migration is marked error."),
    cfg.FloatOpt("post_migration_retry_interval", default=1.0, min=0,
                 help="Seconds before the first retry of a post step "
                      "(doubles each time)."),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
