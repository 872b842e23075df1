"""Settings, host URIs and the connections to each host's libvirt.

A host is reached by name: the name is validated (RFC 1123, the
scheduler's rule) before it goes into a URI or a path.  One connection per
URI is kept open for the driver's life and reopened when it died; this also
keeps a ``test:///FILE`` host alive (every open of such a URI is a new,
independent host).
"""
import contextlib
import dataclasses
import logging
import os
import threading

import libvirt

from migrateflow import exceptions, scheduler

LOG = logging.getLogger(__name__)

# Errors come back as exceptions; libvirt would print each one to stderr too.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_UNSUPPORTED = (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED)
REQUIRED_FLAGS = ("VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The driver's configuration (the [libvirt] options), hashable."""

    connection_uri_template: str = "qemu+tcp://{host}/system"
    connection_uris: tuple = ()          # ((host, uri), ...)
    migration_uri_template: str = "tcp://{host}"
    migration_listen_address: str = None
    instances_path: str = "/var/lib/migrateflow/instances/{host}"
    disk_pool: str = None
    virt_type: str = "kvm"
    cpu_mode: str = None
    cpu_model: str = None
    guest_kernel: str = None
    guest_initrd: str = None
    guest_cmdline: str = "console=ttyS0"
    shutdown_timeout: int = 60
    live_migration_flag: tuple = REQUIRED_FLAGS + ("VIR_MIGRATE_PERSIST_DEST",
                                                   "VIR_MIGRATE_UNDEFINE_SOURCE")
    block_migration_flag: tuple = live_migration_flag + ("VIR_MIGRATE_NON_SHARED_DISK",)

    def __post_init__(self):
        for name in ("live_migration_flag", "block_migration_flag"):
            missing = [f for f in REQUIRED_FLAGS if f not in getattr(self, name)]
            if missing:
                raise ValueError(f"[libvirt] {name} must include {', '.join(missing)}")

    @classmethod
    def from_conf(cls, conf):
        opts = conf.libvirt
        values = {field.name: getattr(opts, field.name) for field in dataclasses.fields(cls)}
        values["connection_uris"] = tuple(sorted((opts.connection_uris or {}).items()))
        for name in ("live_migration_flag", "block_migration_flag"):
            values[name] = tuple(values[name])
        return cls(**values)


def _fill(template, host):
    return template.replace("{host}", scheduler.validate_host_name(host))


def host_uri(settings, host):
    """The libvirt URI of ``host`` (InvalidHostName for a malformed name)."""
    scheduler.validate_host_name(host)
    return dict(settings.connection_uris).get(host) or _fill(
        settings.connection_uri_template, host)


def migration_uri(settings, dest):
    """VIR_MIGRATE_PARAM_URI for ``dest``, or None (libvirt decides)."""
    if not settings.migration_uri_template:
        return None
    return _fill(settings.migration_uri_template, dest)


def instances_root(settings, host):
    """The directory holding ``host``'s instance directories."""
    return _fill(settings.instances_path, host)


def unsupported(err):
    """The connection's driver does not implement the call (test driver)."""
    return err.get_error_code() in _UNSUPPORTED


@contextlib.contextmanager
def libvirt_errors(what):
    """Turn a libvirtError into a DriverError naming ``what`` failed."""
    try:
        yield
    except libvirt.libvirtError as err:
        raise exceptions.DriverError(f"{what}: {err.get_error_message()}") from err


def _test_driver_file(uri):
    """The node file of a test:///FILE URI (None for test:///default)."""
    if not uri.startswith("test:///"):
        return None
    path = uri[len("test://"):].split("?", 1)[0]
    return None if path == "/default" else path


def _open(host, uri):
    node = _test_driver_file(uri)
    if node is not None and not os.path.isfile(node):
        raise exceptions.HostNotFound(host)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        message = err.get_error_message() or str(err)
        if "resolve" in message.lower():
            raise exceptions.HostNotFound(host) from err
        raise exceptions.DriverError(
            f"host {host} is unreachable ({uri}): {message}") from err


def _alive(conn):
    try:
        return conn.isAlive() == 1
    except libvirt.libvirtError:
        return False


class Connections:
    """Open connections by URI, shared by the driver's threads."""

    def __init__(self, settings):
        self.settings = settings
        self._conns = {}
        self._locks = {}
        self._lock = threading.Lock()

    def get(self, host):
        uri = host_uri(self.settings, host)
        with self._lock:     # one lock per URI: a host that hangs holds up only itself
            lock = self._locks.setdefault(uri, threading.Lock())
        with lock:
            conn = self._conns.get(uri)
            if conn is not None and _alive(conn):
                return conn
            if conn is not None:
                LOG.warning("connection to %s (%s) died; reconnecting", host, uri)
            conn = self._conns[uri] = _open(host, uri)
            return conn

    def close(self):
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
