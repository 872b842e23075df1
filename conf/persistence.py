"""[persistence] options: where TaskFlow keeps flow and atom details."""
from oslo_config import cfg

GROUP = cfg.OptGroup("persistence", title="Flow persistence")

OPTS = [
    cfg.StrOpt("backend", default="sql", choices=["sql", "zookeeper", "memory"],
               help="sql: flow details live in a SQL database (durable, "
                    "resumable; see connection); zookeeper: in ZooKeeper ([jobboard]/hosts) "
                    "under zookeeper_path; memory: nothing survives the "
                    "process (no resume)."),
    cfg.StrOpt("zookeeper_path", default="/migrateflow/persistence",
               help="ZooKeeper path of the flow details when backend is "
                    "zookeeper."),
    cfg.StrOpt("connection", secret=True,
               help="SQLAlchemy URL of the flow database (its tables are "
                    "created on first use).  Unset: the state database "
                    "([database]/connection); when that is a SQLite file, a "
                    "file beside it, <name>.flows.sqlite (SQLite lets one "
                    "writer at a time into a file)."),
    cfg.StrOpt("sqlite_synchronous", default="NORMAL",
               choices=["OFF", "NORMAL", "FULL"],
               help="SQLite synchronous pragma (with WAL): NORMAL survives a "
                    "process crash, FULL also a power loss."),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
