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
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
