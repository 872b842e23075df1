"""Units of the libvirt driver that need no hypervisor: host URIs and
paths, migration flags and parameters, job statistics, domain XML edits,
sparse copies, configuration.  (The contract suite runs the driver on
libvirt's test driver; the lab tests on real daemons.)"""
import os
import threading
import time
import xml.etree.ElementTree as ET

import libvirt
import pytest

from migrateflow import drivers, exceptions
from migrateflow.drivers.libvirt import LibvirtDriver, files, guests, hostinfo, jobs, storage
from migrateflow.drivers.libvirt.connection import (Settings, host_uri, instances_root,
                                                    migration_uri)

MIB = 1 << 20


# -- URIs and paths: host names are validated before they go in ----------------------

def test_host_uri_from_the_template():
    settings = Settings(connection_uri_template="qemu+tcp://{host}/system")
    assert host_uri(settings, "compute-1.example.org") == \
        "qemu+tcp://compute-1.example.org/system"


def test_per_host_uris_override_the_template():
    settings = Settings(connection_uris=(("lab-a", "qemu+tcp://127.0.0.1:16601/system"),))
    assert host_uri(settings, "lab-a") == "qemu+tcp://127.0.0.1:16601/system"
    assert host_uri(settings, "lab-b") == "qemu+tcp://lab-b/system"


@pytest.mark.parametrize("name", [
    "evil/../../etc", "a b", "host?socket=/tmp/x", "-leading", "trailing-", "", "x" * 254,
    "host@other", "host:1234", None, "a..b"])
def test_malformed_host_names_never_reach_a_uri_or_a_path(name):
    settings = Settings(connection_uris=((str(name), "test:///default"),))
    for build in (lambda: host_uri(settings, name), lambda: migration_uri(settings, name),
                  lambda: instances_root(Settings(instances_path="/srv/{host}"), name)):
        with pytest.raises(exceptions.InvalidHostName):
            build()


def test_migration_uri_and_instances_path_templates():
    settings = Settings(migration_uri_template="tcp://{host}:49152",
                        instances_path="/srv/instances/{host}")
    assert migration_uri(settings, "node-2") == "tcp://node-2:49152"
    assert instances_root(settings, "node-2") == "/srv/instances/node-2"
    assert migration_uri(Settings(migration_uri_template=""), "node-2") is None
    # without {host} every host has the same directory: shared storage
    assert instances_root(Settings(instances_path="/nfs/instances"), "node-2") == \
        "/nfs/instances"


def test_an_unknown_test_driver_host_is_not_found(tmp_path):
    driver = LibvirtDriver(Settings(connection_uri_template=f"test://{tmp_path}/{{host}}.xml"))
    with pytest.raises(exceptions.HostNotFound):
        driver.get_host_info("ghost")


def test_an_unreachable_host_is_a_driver_error():
    driver = LibvirtDriver(Settings(connection_uris=(
        ("down-1", "qemu+tcp://127.0.0.1:1/system"),)))
    with pytest.raises(exceptions.DriverError, match="down-1 is unreachable"):
        driver.get_host_info("down-1")


# -- configuration ------------------------------------------------------------------------

def test_driver_loaded_by_name_from_the_configuration(conf, tmp_path):
    conf.set_override("compute_driver", "libvirt")
    conf.set_override("connection_uris", {"lab-a": "qemu+tcp://127.0.0.1:1/system"},
                      "libvirt")
    conf.set_override("instances_path", str(tmp_path / "{host}"), "libvirt")
    try:
        driver = drivers.get_driver(conf)
        assert isinstance(driver, LibvirtDriver)
        assert driver is drivers.get_driver(conf)      # cached per settings
        assert driver.settings.connection_uris == (
            ("lab-a", "qemu+tcp://127.0.0.1:1/system"),)
        assert driver.settings.instances_path == str(tmp_path / "{host}")
    finally:
        for name, group in (("compute_driver", None), ("connection_uris", "libvirt"),
                            ("instances_path", "libvirt")):
            conf.clear_override(name, group)


def test_live_and_peer_to_peer_are_required():
    with pytest.raises(ValueError, match="VIR_MIGRATE_PEER2PEER"):
        Settings(live_migration_flag=("VIR_MIGRATE_LIVE",))


# -- migration flags and parameters ----------------------------------------------------------

BASE = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@pytest.mark.parametrize("block, params, expected", [
    (False, {}, BASE),
    (True, {}, BASE | libvirt.VIR_MIGRATE_NON_SHARED_DISK),
    (False, {"auto_converge": True}, BASE | libvirt.VIR_MIGRATE_AUTO_CONVERGE),
    (False, {"post_copy": True}, BASE | libvirt.VIR_MIGRATE_POSTCOPY),
    # post-copy makes auto-converge needless (Nova's rule)
    (True, {"post_copy": True, "auto_converge": True},
     BASE | libvirt.VIR_MIGRATE_NON_SHARED_DISK | libvirt.VIR_MIGRATE_POSTCOPY),
])
def test_migration_flags(block, params, expected):
    assert jobs.migration_flags(Settings(), block, params) == expected


def test_configured_flags_are_used_and_disk_flags_only_for_block_migration():
    settings = Settings(live_migration_flag=(
        "VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_NON_SHARED_INC",
        "VIR_MIGRATE_UNSAFE"))
    assert jobs.migration_flags(settings, False, {}) == (
        libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_UNSAFE)


def test_migration_parameters():
    assert jobs.migration_params("tcp://node-2", {"bandwidth_mbps": 100}, "<d/>", "<p/>",
                                 "127.0.0.1") == {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://node-2",
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 100,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: "<d/>",
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: "<p/>",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}
    assert jobs.migration_params(None, {"bandwidth_mbps": 0}) == {}


# -- job statistics → MigrationJob -------------------------------------------------------------

RUNNING_STATS = {
    "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
    "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
    "time_elapsed": 2500, "memory_total": 512 * MIB, "memory_processed": 300 * MIB,
    "memory_remaining": 212 * MIB, "memory_dirty_rate": 25600, "memory_page_size": 4096,
    "memory_iteration": 3, "auto_converge_throttle": 30, "downtime": 120,
    "memory_bps": 40 * MIB,
}


def test_running_job_view():
    job = jobs.job_view(RUNNING_STATS, "running")
    assert job == {
        "status": "running", "memory_total_mb": 512.0, "memory_processed_mb": 300.0,
        "memory_remaining_mb": 212.0, "dirty_rate_mbps": 100.0, "iteration": 3,
        "time_elapsed": 2.5, "downtime_ms": None, "post_copy": False, "throttle_pct": 30,
        "error": None, "bandwidth_mbps": 40.0}


def test_completed_job_view_has_the_downtime():
    stats = dict(RUNNING_STATS, type=libvirt.VIR_DOMAIN_JOB_COMPLETED, memory_remaining=0)
    job = jobs.job_view(stats, "completed", post_copy=True)
    assert (job["downtime_ms"], job["memory_remaining_mb"], job["post_copy"]) == (120, 0, True)


def test_the_bandwidth_is_unknown_until_qemu_measured_it():
    assert jobs.job_view(dict(RUNNING_STATS, memory_bps=0), "running")["bandwidth_mbps"] is None


def test_waiting_for_a_job_of_this_process_ends_with_its_thread():
    """The watch's pause between two looks ends as soon as the thread that
    runs migrateToURI3 returns; without such a thread it is a plain sleep."""
    driver = LibvirtDriver(Settings())
    done = threading.Event()
    thread = threading.Thread(target=done.wait, args=(5,), daemon=True)
    thread.start()
    driver._threads[("node-1", "uuid-1")] = {"thread": thread, "downtime_ms": None}
    threading.Timer(0.1, done.set).start()
    started = time.monotonic()
    driver.wait_for_migration_job("node-1", {"uuid": "uuid-1"}, 5.0)
    assert time.monotonic() - started < 2.0
    started = time.monotonic()
    driver.wait_for_migration_job("node-1", {"uuid": "uuid-2"}, 0.2)
    assert time.monotonic() - started >= 0.2


def test_job_being_set_up_and_ended_job_without_figures():
    assert jobs.job_view(None, "running", memory_mb=256)["memory_total_mb"] == 256.0
    failed = jobs.job_view(None, "failed", error="boom", memory_mb=256)
    assert (failed["status"], failed["error"], failed["memory_remaining_mb"]) == \
        ("failed", "boom", 0)


@pytest.mark.parametrize("stats, outgoing", [
    (RUNNING_STATS, True),
    ({"type": libvirt.VIR_DOMAIN_JOB_NONE}, False),
    (dict(RUNNING_STATS, operation=libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP), False),
    (dict(RUNNING_STATS, type=libvirt.VIR_DOMAIN_JOB_COMPLETED), False),
])
def test_outgoing_migration_detection(stats, outgoing):
    assert jobs.is_outgoing_migration(stats) is outgoing


def test_an_aborted_job_is_cancelled_else_failed():
    aborted = libvirt.libvirtError("x")
    aborted.err = (libvirt.VIR_ERR_OPERATION_ABORTED, 0, "canceled by client", 2,
                   None, None, None, 0, 0)
    other = libvirt.libvirtError("y")
    other.err = (libvirt.VIR_ERR_OPERATION_FAILED, 0, "boom", 2, None, None, None, 0, 0)
    assert jobs.ended_status(aborted, False) == "cancelled"
    assert jobs.ended_status(other, True) == "cancelled"
    assert jobs.ended_status(other, False) == "failed"


# -- domain XML --------------------------------------------------------------------------------

INSTANCE = {"uuid": "c0ffee00-0000-4000-8000-000000000001", "name": "vm<&>1",
            "memory_mb": 512, "vcpus": 2, "disk_gb": 3, "volume_backed": False}


def test_domain_xml_for_qemu(tmp_path):
    settings = Settings(instances_path=str(tmp_path / "{host}"), virt_type="qemu",
                        cpu_mode="custom", cpu_model="qemu64", guest_kernel="/k",
                        guest_initrd="/i", guest_cmdline="console=ttyS0 n={name} u={uuid}")
    store = storage.HostStorage(settings, "node-1")
    root = ET.fromstring(guests.domain_xml(settings, "qemu", INSTANCE, store))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vm<&>1"
    assert root.findtext("uuid") == INSTANCE["uuid"]
    assert (root.findtext("memory"), root.find("memory").get("unit")) == ("512", "MiB")
    assert root.findtext("os/cmdline") == f"console=ttyS0 n=vm<&>1 u={INSTANCE['uuid']}"
    assert root.findtext("cpu/model") == "qemu64"
    # ACPI (the power button; QEMU 9.0 has no -no-acpi for libvirt to pass)
    assert [f.tag for f in root.find("features")] == ["acpi", "apic"]
    assert root.find("devices/disk/source").get("file") == store.disk(INSTANCE["uuid"])
    assert root.find("devices/serial/source").get("path") == \
        store.console_log(INSTANCE["uuid"])


def test_flavor_and_paths_are_edited_in_the_definition(tmp_path):
    settings = Settings(instances_path=str(tmp_path / "{host}"), virt_type="qemu")
    src, dst = (storage.HostStorage(settings, h) for h in ("node-1", "node-2"))
    xml = guests.domain_xml(settings, "qemu", INSTANCE, src)
    resized = guests.with_flavor(xml, {"memory_mb": 2048, "vcpus": 4, "disk_gb": 40})
    moved = ET.fromstring(guests.moved(resized, src.instance_dir(INSTANCE["uuid"]),
                                       dst.instance_dir(INSTANCE["uuid"])))
    assert moved.findtext("vcpu") == "4" and moved.findtext("memory") == "2048"
    assert moved.find(f"metadata/{{{guests.XMLNS}}}flavor").get("disk_gb") == "40"
    assert moved.find("devices/disk/source").get("file") == dst.disk(INSTANCE["uuid"])
    assert moved.find("devices/serial/source").get("path") == \
        dst.console_log(INSTANCE["uuid"])


# -- CPU comparison where libvirt cannot compare (the test driver) ---------------------------------

class _NoCompareConn:
    """A connection whose driver has no compareCPU, with a fixed host CPU."""

    def getCapabilities(self):
        return ("<capabilities><host><cpu><arch>x86_64</arch><model>Haswell</model>"
                "<feature name='avx'/><feature name='sse4.2'/></cpu></host></capabilities>")

    def getInfo(self):
        return ["x86_64", 4096, 4, 2000, 1, 1, 4, 1]

    def compareCPU(self, xml, flags):
        err = libvirt.libvirtError("no support")
        err.err = (libvirt.VIR_ERR_NO_SUPPORT, 0, "not supported", 2, None, None, None, 0, 0)
        raise err


def test_cpu_features_decide_when_libvirt_cannot_compare():
    conn = _NoCompareConn()
    hostinfo.compare_cpu(conn, "node-2", {"cpu_model": "Haswell", "cpu_features": ["avx"]})
    with pytest.raises(exceptions.CPUIncompatible, match="avx2"):
        hostinfo.compare_cpu(conn, "node-2", {"cpu_model": "Skylake",
                                              "cpu_features": ["avx", "avx2"]})


# -- files ---------------------------------------------------------------------------------------

def test_sparse_copy_keeps_holes_and_data(tmp_path):
    src, dst = tmp_path / "disk", tmp_path / "copy"
    with open(src, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(32 * MIB)
        f.write(b"migrateflow")
    files.copy_sparse(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < 4 * MIB     # the holes stayed holes


def test_records_keep_hosts_apart_on_shared_storage(tmp_path):
    settings = Settings(instances_path=str(tmp_path / "shared"))
    a, b = storage.HostStorage(settings, "node-a"), storage.HostStorage(settings, "node-b")
    uuid = INSTANCE["uuid"]
    a.ensure_instance_dir(uuid, 1 * MIB)
    assert a.plug(uuid, [{"port_id": "p1"}], [{"volume_id": "v1"}]) is True
    assert a.plug(uuid, [{"port_id": "p1"}], [{"volume_id": "v1"}]) is False
    b.hold(uuid, from_host="node-a")
    assert a.holders(uuid) == ["node-a", "node-b"]
    assert a.drop_instance_dir(uuid) is False          # node-b still uses the disk
    assert b.forget(uuid) is True
    assert a.unplug(uuid) is True and a.record(uuid)["vifs"] == []
    a.forget(uuid)
    assert a.drop_instance_dir(uuid) is True


def test_instance_storage_failures_are_driver_errors(tmp_path):
    (tmp_path / "node-1.xml").write_text("<node><memory>1048576</memory></node>")
    (tmp_path / "not-a-directory").write_text("")
    driver = LibvirtDriver(Settings(
        connection_uri_template=f"test://{tmp_path}/{{host}}.xml",
        instances_path=str(tmp_path / "not-a-directory" / "{host}")))
    with pytest.raises(exceptions.DriverError, match="spawn: instance storage"):
        driver.spawn("node-1", INSTANCE, [], [])
    assert driver.get_guest("node-1", INSTANCE["uuid"]) is None
