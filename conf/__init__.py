"""Configuration: oslo.config option groups, registered on ``cfg.CONF``.

Options are registered at import and read only at run time.  ``list_opts()``
feeds ``oslo-config-generator --namespace migrateflow``.
"""
from oslo_config import cfg
from oslo_db import options as db_options
from oslo_policy import opts as policy_options

from migrateflow.conf import (compute, fake_driver, jobboard, libvirt, migration, notifications,
                              persistence)

CONF = cfg.CONF

_MODULES = (compute, migration, persistence, jobboard, fake_driver, libvirt, notifications)


def register_opts(conf):
    for module in _MODULES:
        module.register_opts(conf)
    db_options.set_defaults(conf)
    policy_options.set_defaults(conf)  # [oslo_policy], read by policy.py


def list_opts():
    """(group, options) pairs for oslo-config-generator."""
    opts = []
    for module in _MODULES:
        opts.extend(module.list_opts())
    opts.extend(db_options.list_opts())
    return opts


register_opts(CONF)
