"""pytest fixtures for the real libvirt + QEMU lab (loaded by tests/conftest.py
as the plugin ``libvirt_lab``; the lab itself is tools/libvirt-lab/lab.sh).

- ``libvirt_lab`` (session): two private libvirtd daemons, hosts ``lab-a``
  and ``lab-b``, each in its own mount namespace with its own host UUID,
  listening on free loopback TCP ports; and the guest (a Debian kernel and
  a busybox initramfs, built once into ``$MIGRATEFLOW_LAB_CACHE``, default
  ``~/.cache/migrateflow/libvirt-lab``).  Started by the first test that
  asks for it, stopped at the end of the session: every domain destroyed,
  then each daemon stopped by its pid.  When the lab cannot run here (not
  root, packages missing) the fixture FAILS naming the cause
  (``tools/test-all.sh`` installs the packages): lab tests are never skipped.
- ``lab_conf``: the ``conf`` fixture with ``compute_driver = libvirt`` on the
  lab (each host's instances in ``<lab>/instances/<host>``, TCG guests);
  every guest is destroyed and every instance file removed after the test.
- ``lab_cloud``: (state database, driver, MigrationAPI) on ``lab_conf``;
  ``slow_shared_copy``: the same with both hosts recorded on one shared
  instances directory and copies capped at 10 MiB/s.
"""
import atexit
import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

import servers
from migrateflow import api, cloud, drivers
from migrateflow.db import api as db_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_SCRIPT = os.path.join(ROOT, "tools", "libvirt-lab", "lab.sh")
HOSTS = ("lab-a", "lab-b")
#: first port of each daemon's range for incoming migrations (and NBD):
#: below Linux's ephemeral range (32768-60999), where an outgoing
#: connection of anything on the machine can hold a port (libvirt's default,
#: 49152-49215, lies inside it: "Failed to find an available port")
MIGRATION_PORTS = {"lab-a": 24152, "lab-b": 24168}
#: TCG's dirty-page tracking keeps up with a migration's passes from 9.0 on
QEMU_MIN = (9, 0)
NEEDED = ("libvirtd", "virsh", "qemu-system-x86_64", "unshare", "gcc", "cpio", "dpkg-deb")


@dataclasses.dataclass
class Lab:
    path: str
    ports: dict
    kernel: str
    initrd: str
    timings: dict

    def uri(self, host):
        return f"qemu+tcp://127.0.0.1:{self.ports[host]}/system"

    def instances(self, host=None):
        """A host's instances path (``{host}`` when None: the template)."""
        return os.path.join(self.path, "instances", host or "{host}")

    @property
    def shared_instances(self):
        return os.path.join(self.path, "shared-instances")

    def console(self, instances, instance_uuid):
        return os.path.join(instances, instance_uuid, "console.log")

    def destroy_all(self):
        """Destroy and undefine every domain of both daemons."""
        import libvirt
        for host in HOSTS:
            conn = libvirt.open(self.uri(host))
            try:
                for dom in conn.listAllDomains(0):
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefine()
            finally:
                conn.close()


def _fail(message):
    pytest.fail(message, pytrace=False)


def _run(*args, timeout=300):
    proc = subprocess.run(["bash", LAB_SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        _fail(f"lab.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def _check_prerequisites():
    if os.geteuid() != 0:
        _fail("the libvirt lab runs private libvirtd daemons: it needs root")
    missing = [tool for tool in NEEDED if shutil.which(tool) is None
               and not os.path.exists(f"/usr/sbin/{tool}")]
    if missing:
        _fail(f"the libvirt lab needs {', '.join(missing)}: bash tools/test-all.sh "
              "installs qemu-system-x86 libvirt-daemon-system libvirt-clients gcc "
              "libc6-dev cpio")
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True).stdout
    found = re.match(r"QEMU emulator version (\d+)\.(\d+)", version)
    if not found or (int(found[1]), int(found[2])) < QEMU_MIN:
        _fail(f"the libvirt lab needs QEMU {'.'.join(map(str, QEMU_MIN))} or newer, this is "
              f"{version.splitlines()[0] if version else 'unknown'}: before 9.0, TCG's "
              "dirty-page tracking loses a guest's writes during a live migration's copy "
              "(a guest moved by a long copy crashes on arrival); bash tools/test-all.sh "
              "installs QEMU from bookworm-backports on Debian 12")
    try:
        importlib.import_module("libvirt")
    except ImportError as err:
        _fail(f"libvirt-python is not importable ({err}); bash tools/test-all.sh "
              "installs it")


@pytest.fixture(scope="session")
def libvirt_lab(tmp_path_factory):
    _check_prerequisites()
    timings = {}
    started = time.monotonic()
    cache = os.environ.get("MIGRATEFLOW_LAB_CACHE") or os.path.expanduser(
        "~/.cache/migrateflow/libvirt-lab")
    _run("guest", cache, timeout=600)
    timings["guest_build_s"] = time.monotonic() - started
    lab_dir = str(tmp_path_factory.mktemp("libvirt-lab"))
    ports, running = {}, []

    def stop():
        for host in list(running):
            subprocess.run(["bash", LAB_SCRIPT, "stop", lab_dir, host], timeout=120,
                           capture_output=True)
            running.remove(host)
    atexit.register(stop)
    daemons_started = time.monotonic()
    try:
        for host in HOSTS:
            ports[host] = servers.free_port()
            _run("start", lab_dir, host, str(ports[host]), str(uuid.uuid4()),
                 str(MIGRATION_PORTS[host]), cache)
            running.append(host)
        timings["daemons_start_s"] = time.monotonic() - daemons_started
        yield Lab(lab_dir, ports, os.path.join(cache, "vmlinuz"),
                  os.path.join(cache, "initrd.gz"), timings)
    finally:
        stop()
        atexit.unregister(stop)


@pytest.fixture
def lab_conf(conf, libvirt_lab):
    """``conf`` with the libvirt driver on the lab's two hosts."""
    lab = libvirt_lab
    overrides = [
        ("compute_driver", "libvirt", None),
        ("connection_uris", {h: lab.uri(h) for h in HOSTS}, "libvirt"),
        ("migration_uri_template", "tcp://127.0.0.1", "libvirt"),
        ("migration_listen_address", "127.0.0.1", "libvirt"),
        ("instances_path", lab.instances(), "libvirt"),
        ("virt_type", "qemu", "libvirt"),
        ("cpu_mode", "custom", "libvirt"),
        ("cpu_model", "qemu64", "libvirt"),
        ("guest_kernel", lab.kernel, "libvirt"),
        ("guest_initrd", lab.initrd, "libvirt"),
        ("guest_cmdline", "console=ttyS0 quiet panic=-1 mf_name={name}", "libvirt"),
        ("shutdown_timeout", 0, "libvirt"),
        ("live_migration_poll_interval", 0.2, "migration"),
    ]
    for name, value, group in overrides:
        conf.set_override(name, value, group=group)
    yield conf
    for name, _value, group in overrides:
        conf.clear_override(name, group=group)
    lab.destroy_all()
    for path in (os.path.join(lab.path, "instances"), lab.shared_instances):
        shutil.rmtree(path, ignore_errors=True)


def add_lab_hosts(db, driver, shared_storage=None):
    """Host rows as a cloud would record them: the hypervisors' own facts."""
    for name in HOSTS:
        cloud.record_host(db, driver, name, vcpus=8, shared_storage=shared_storage)


@pytest.fixture
def lab_cloud(lab_conf, libvirt_lab):
    db = db_api.get_db(lab_conf)
    driver = drivers.get_driver(lab_conf)
    return db, driver, api.MigrationAPI(lab_conf)


@pytest.fixture
def slow_shared_copy(lab_cloud, libvirt_lab, lab_conf):
    """Both hosts on one (shared) instances directory, copies capped at
    10 MiB/s: a guest dirtying 64 MiB without pause never converges."""
    overrides = [
        ("instances_path", libvirt_lab.shared_instances, "libvirt"),
        # a local directory both daemons see: libvirt cannot tell it is shared
        ("live_migration_flag", ["VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER",
                                 "VIR_MIGRATE_PERSIST_DEST", "VIR_MIGRATE_UNDEFINE_SOURCE",
                                 "VIR_MIGRATE_UNSAFE"], "libvirt"),
        ("live_migration_bandwidth", 10, "migration"),
    ]
    for name, value, group in overrides:
        lab_conf.set_override(name, value, group)
    db, _driver, client = lab_cloud
    driver = drivers.get_driver(lab_conf)
    add_lab_hosts(db, driver, shared_storage="lab-shared")
    yield db, driver, client
    for name, _value, group in overrides:
        lab_conf.clear_override(name, group)
