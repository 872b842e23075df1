"""[fake_driver] options: the deterministic in-memory hypervisor."""
from oslo_config import cfg

GROUP = cfg.OptGroup("fake_driver", title="Fake hypervisor driver")

OPTS = [
    cfg.StrOpt("state_file",
               help="SQLite file holding the fake hypervisors' state, shared "
                    "by every process; unset: fake-hypervisor.sqlite under "
                    "state_path."),
    cfg.FloatOpt("time_scale", default=0.0, min=0,
                 help="Wall-clock seconds slept per simulated second of "
                      "migration; 0 runs the model instantly."),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
