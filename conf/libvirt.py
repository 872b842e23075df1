"""[libvirt] options: how the libvirt driver reaches hosts and builds guests.

Host names are validated (RFC 1123) before they are put into a URI or a
path.  The migration behaviour the engine applies to every driver
(bandwidth, downtime, auto-converge, post-copy) is in [migration].
"""
from oslo_config import cfg
from oslo_config import types

GROUP = cfg.OptGroup("libvirt", title="libvirt driver")

#: libvirt migration flags an operator may list; the driver needs LIVE and
#: PEER2PEER (a peer-to-peer job outlives the process that started it).
MIGRATION_FLAGS = ("VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_PERSIST_DEST",
                   "VIR_MIGRATE_UNDEFINE_SOURCE", "VIR_MIGRATE_NON_SHARED_DISK",
                   "VIR_MIGRATE_NON_SHARED_INC", "VIR_MIGRATE_COMPRESSED",
                   "VIR_MIGRATE_ABORT_ON_ERROR", "VIR_MIGRATE_UNSAFE")
_FLAG = types.String(choices=MIGRATION_FLAGS)
_LIVE_FLAGS = ["VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_PERSIST_DEST",
               "VIR_MIGRATE_UNDEFINE_SOURCE"]

OPTS = [
    cfg.StrOpt("connection_uri_template", default="qemu+tcp://{host}/system",
               help="libvirt URI of a host; {host} is replaced by the host "
                    "name (validated first).  A test:///PATH URI opens "
                    "libvirt's in-process test driver (one independent host "
                    "per URI)."),
    cfg.DictOpt("connection_uris", default={},
                help="Per-host URIs (host:uri,...) overriding "
                     "connection_uri_template, e.g. two daemons on one "
                     "machine listening on different ports."),
    cfg.StrOpt("migration_uri_template", default="tcp://{host}",
               help="Where the destination's hypervisor receives the memory "
                    "stream (VIR_MIGRATE_PARAM_URI); {host} is the "
                    "destination's name.  Empty: libvirt's choice."),
    cfg.StrOpt("migration_listen_address",
               help="Address the destination's hypervisor listens on for the "
                    "memory and disk streams (VIR_MIGRATE_PARAM_LISTEN_ADDRESS); "
                    "unset: libvirt's default (every address)."),
    cfg.StrOpt("instances_path", default="/var/lib/migrateflow/instances/{host}",
               help="Directory of a host's instance directories as this "
                    "process sees it (the driver reads and writes instance "
                    "files there: probes, disk copies); {host} is replaced by "
                    "the host name.  Hosts whose paths are the same directory "
                    "share instance storage (set a path without {host} for "
                    "one shared file system)."),
    cfg.StrOpt("disk_pool",
               help="libvirt storage pool (same name on every host) whose "
                    "capacity and available space are the host's disk "
                    "facts; unset: the file system of instances_path."),
    cfg.StrOpt("virt_type", default="kvm", choices=["kvm", "qemu"],
               help="Domain type of the guests this driver defines (libvirt's "
                    "test driver always gets 'test').  qemu: TCG emulation."),
    cfg.StrOpt("cpu_mode", choices=["host-model", "host-passthrough", "custom", "none"],
               help="Guest CPU mode; unset: host-model for kvm, none for qemu."),
    cfg.StrOpt("cpu_model", help="Guest CPU model when cpu_mode is custom."),
    cfg.StrOpt("guest_kernel",
               help="Kernel booted directly by every guest (images are not "
                    "handled by this driver yet); unset: boot from the disk."),
    cfg.StrOpt("guest_initrd", help="Initramfs of guest_kernel."),
    cfg.StrOpt("guest_cmdline", default="console=ttyS0",
               help="Kernel command line of guest_kernel; {name} and {uuid} "
                    "are the instance's."),
    cfg.IntOpt("shutdown_timeout", default=60, min=0,
               help="Seconds a power-off waits for the guest to shut down "
                    "cleanly before it is powered off; 0 powers off at once."),
    cfg.ListOpt("live_migration_flag", item_type=_FLAG, default=_LIVE_FLAGS,
                help="libvirt flags of a live migration on shared storage "
                     "(LIVE and PEER2PEER are required).  Auto-converge and "
                     "post-copy are added when [migration] permits them.  "
                     "VIR_MIGRATE_UNSAFE: storage shared in a way libvirt does "
                     "not recognise (not NFS, GFS2, Ceph...)."),
    cfg.ListOpt("block_migration_flag", item_type=_FLAG,
                default=_LIVE_FLAGS + ["VIR_MIGRATE_NON_SHARED_DISK"],
                help="libvirt flags of a block migration (the disks are "
                     "copied too)."),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
