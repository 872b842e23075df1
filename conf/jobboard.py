"""[jobboard] options: ZooKeeper jobboard used by conductors."""
from oslo_config import cfg

GROUP = cfg.OptGroup("jobboard", title="ZooKeeper jobboard")

OPTS = [
    cfg.BoolOpt("enabled", default=False,
                help="Post operations to the jobboard instead of running "
                     "them in the calling process."),
    cfg.ListOpt("hosts", default=["127.0.0.1:2181"],
                help="ZooKeeper servers as host:port."),
    cfg.StrOpt("path", default="/migrateflow/jobs",
               help="ZooKeeper path of the jobboard."),
    cfg.FloatOpt("session_timeout", default=10.0, min=1.0,
                 help="ZooKeeper session timeout in seconds: how long a dead "
                      "conductor keeps its jobs claimed."),
    cfg.IntOpt("conductor_workers", default=4, min=1,
               help="Jobs one conductor runs at the same time."),
    cfg.StrOpt("conductor_name", sample_default="<host name>-<pid>",
               help="Name a conductor claims jobs under (default: host "
                    "name and process id)."),
    cfg.IntOpt("stuck_after", default=300, min=1,
               help="Seconds a transitional migration may go without a "
                    "running or claimable job before the sweeper acts."),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
