"""[DEFAULT] options: driver choice, state location and Nova's scheduling limits."""
from oslo_config import cfg

OPTS = [
    cfg.StrOpt("compute_driver", default="fake",
               help="Hypervisor driver, by entry point name in the "
                    "'migrateflow.drivers' namespace (fake, libvirt)."),
    cfg.StrOpt("state_path", default="$pybasedir/migrateflow-state",
               help="Directory for the embedded default's files: the SQLite "
                    "state database and the fake hypervisor's shared state."),
    cfg.StrOpt("pybasedir", default=".", sample_default="<current directory>",
               help="Base directory that state_path is relative to."),
    cfg.IntOpt("max_concurrent_live_migrations", default=1, min=0,
               help="Maximum number of live migrations to run at once per "
                    "source host; 0 means unlimited (as in Nova)."),
    cfg.IntOpt("max_concurrent_migrations_global", default=0, min=0,
               help="Maximum number of migrations a host drain runs at once "
                    "in this process, across every drain running in it (on "
                    "top of max_concurrent_live_migrations per source host); "
                    "0 means unlimited."),
    cfg.IntOpt("migrate_max_retries", default=-1, min=-1,
               help="Alternate destinations to try after the first fails its "
                    "checks; -1 tries every candidate, 0 disables retries."),
    cfg.BoolOpt("allow_resize_to_same_host", default=False,
                help="Allow the destination of a resize to be its source."),
    cfg.IntOpt("resize_confirm_window", default=0, min=0,
               help="Seconds after which a finished resize is confirmed "
                    "automatically; 0 disables auto-confirm."),
]


def register_opts(conf):
    conf.register_opts(OPTS)


def list_opts():
    return [("DEFAULT", OPTS)]
