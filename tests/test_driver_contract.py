"""The ComputeDriver contract, run against every driver.

Tests speak only the ABC methods plus a small per-driver *harness* that knows
how to build hosts and guests for its driver and how to look at a host's
state (VIFs, volume connections, instance files, guests).  Adding a driver
means adding a harness class to HARNESSES.
"""
import os

import pytest

from migrateflow import exceptions
from migrateflow.drivers.fake import FakeDriver

try:
    from migrateflow.drivers.libvirt import LibvirtDriver, guests as libvirt_guests
    from migrateflow.drivers.libvirt.connection import Settings as LibvirtSettings
    from migrateflow.drivers.libvirt.storage import GIB, HostStorage
    LIBVIRT_IMPORT_ERROR = None
except ImportError as err:   # the libvirt harness then fails: never skipped
    LIBVIRT_IMPORT_ERROR = err

NET = [{"port_id": "4b1d0c8e-2f7a-4e39-8c55-93a1f0d2e6b7", "mac": "fa:16:3e:00:00:02",
        "network_id": "net-1"}]
BDI = [{"volume_id": "vol-9", "device": "/dev/vdb"}]
PARAMS = {"bandwidth_mbps": 0, "downtime_ms": 500, "auto_converge": False,
          "post_copy": False}


class FakeHarness:
    """Hosts and guests of the fake driver, in a SQLite file under tmp_path.

    make_host facts: shared_storage (group name), cpu_features, disk_gb,
    memory_mb; make_guest starts a running guest with its VIFs and volumes.
    """

    def __init__(self, tmp_path):
        self.driver = FakeDriver(str(tmp_path / "contract-hv.sqlite"))

    def make_host(self, name, **facts):
        self.driver.add_host(name, **facts)
        return name

    def make_guest(self, host, instance, network_info=NET, block_device_info=BDI):
        self.driver.spawn(host, instance, network_info, block_device_info)

    def require(self, capability):
        """The fake can do everything a test asks."""

    def host_path(self, host, path):
        """Where the contract's instance path ``path`` is on ``host``."""
        return path

    def set_dirty_rate(self, instance_uuid, mbps):
        self.driver.set_dirty_rate(instance_uuid, mbps)

    def path_exists(self, host, path):
        return any(f["path"] == path for f in self.driver.files(host))

    def disk_gb(self, host, path):
        """Size of the file at ``path`` in ``host``'s storage, None if absent."""
        return next((f["disk_gb"] for f in self.driver.files(host) if f["path"] == path),
                    None)

    def guest_flavor(self, host, instance_uuid):
        """{memory_mb, vcpus, disk_gb} the guest is defined with on ``host``."""
        return next(({k: g[k] for k in ("memory_mb", "vcpus", "disk_gb")}
                     for g in self.driver.guests(host) if g["uuid"] == instance_uuid), None)

    def inject_failure(self, method, host, when):
        """Make the next call of ``method`` on ``host`` raise a DriverError,
        before ("before") or after ("after") its side effect."""
        self.driver.inject_fault(method, host=host, when=when)

    def host_state(self, host):
        """Everything a migration may leave behind on ``host``, comparable."""
        return {"vifs": self.driver.vifs(host),
                "volumes": self.driver.volume_connections(host),
                "files": self.driver.files(host),
                "guests": self.driver.guests(host)}


#: where the tests name instance files (the fake driver's instances directory)
CONTRACT_ROOT = "/var/lib/migrateflow/instances"
_TEST_NODE = """<node>
  <cpu><mhz>2000</mhz><model>{cpu_model}</model><active>4</active><nodes>1</nodes>
    <sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>
  <memory>{memory_kib}</memory>
  <pool type="dir"><name>instances</name><target><path>{root}</path></target></pool>
</node>
"""


class LibvirtTestHarness:
    """Hosts of libvirt's in-process test driver: ``test:///<tmp>/libvirt-nodes/<host>.xml``
    (each open of such a URI is an independent host, so the driver's one
    connection per host *is* the host).  Instance storage in
    ``<tmp>/libvirt-storage/<host>``, a symlink to ``.../shared-<group>``
    for hosts sharing storage; a host's disk size is the capacity of its
    ``instances`` pool (the test driver makes every pool 100 GiB: a volume
    takes what the host should not have), its memory the node's.

    The test driver cannot migrate (migrate*, jobStats, abortJob) nor compare
    CPUs (compareCPU), and its host CPU is fixed: those parts are skipped
    here and run by the lab tests (tests/test_libvirt_lab*.py).
    """

    UNSUPPORTED = {
        "migrate": "libvirt's test driver cannot migrate: covered by the lab tests",
        "cpu_features": "libvirt's test driver has a fixed host CPU and no compareCPU: "
                        "the fallback is unit-tested, compareCPU runs in the lab tests",
    }

    def __init__(self, tmp_path):
        if LIBVIRT_IMPORT_ERROR is not None:
            pytest.fail(f"libvirt-python is not importable ({LIBVIRT_IMPORT_ERROR}); "
                        "bash tools/test-all.sh installs it", pytrace=False)
        self.nodes = tmp_path / "libvirt-nodes"
        self.storage = tmp_path / "libvirt-storage"
        self.nodes.mkdir()
        self.storage.mkdir()
        self.settings = LibvirtSettings(
            connection_uri_template=f"test://{self.nodes}/{{host}}.xml",
            instances_path=f"{self.storage}/{{host}}", disk_pool="instances",
            migration_uri_template="", shutdown_timeout=0)
        self.driver = LibvirtDriver(self.settings)
        self.hosts = []

    def require(self, capability):
        if capability in self.UNSUPPORTED:
            pytest.skip(self.UNSUPPORTED[capability])

    POOL_GB = 100

    def make_host(self, name, shared_storage=None, cpu_features=None, disk_gb=POOL_GB,
                  memory_mb=65536):
        root = self.storage / name
        if shared_storage:
            target = self.storage / f"shared-{shared_storage}"
            target.mkdir(exist_ok=True)
            root.symlink_to(target)
        else:
            root.mkdir()
        (self.nodes / f"{name}.xml").write_text(_TEST_NODE.format(
            cpu_model="Haswell", memory_kib=memory_mb * 1024, root=root))
        self.hosts.append(name)
        conn = self.driver.connection(name)   # opened once: the host lives from now on
        if disk_gb < self.POOL_GB:
            conn.storagePoolLookupByName("instances").createXML(
                f"<volume><name>taken</name><capacity unit='GiB'>{self.POOL_GB - disk_gb}"
                f"</capacity><allocation unit='GiB'>{self.POOL_GB - disk_gb}</allocation>"
                "</volume>", 0)
        return name

    def make_guest(self, host, instance, network_info=NET, block_device_info=BDI):
        self.driver.spawn(host, instance, network_info, block_device_info)

    def set_dirty_rate(self, instance_uuid, mbps):
        self.require("migrate")

    def _relative(self, path):
        for prefix in [CONTRACT_ROOT] + [str(self.storage / h) for h in self.hosts]:
            if path.startswith(prefix + "/"):
                return path[len(prefix) + 1:]
        raise AssertionError(f"{path} is not in any host's instance storage")

    def host_path(self, host, path):
        return os.path.join(str(self.storage / host), self._relative(path))

    def path_exists(self, host, path):
        return os.path.exists(self.host_path(host, path))

    def disk_gb(self, host, path):
        return self._size_gb(self.host_path(host, path))

    @staticmethod
    def _size_gb(path):
        if os.path.isdir(path):
            path = os.path.join(path, "disk")
        if not os.path.exists(path):
            return None
        return -(-os.path.getsize(path) // GIB)

    def guest_flavor(self, host, instance_uuid):
        dom = libvirt_guests.find(self.driver.connection(host), instance_uuid)
        return libvirt_guests.flavor(dom) if dom is not None else None

    def inject_failure(self, method, host, when):
        """The next call of ``method`` addressed to ``host`` raises a
        DriverError, before or after the real call."""
        real = getattr(self.driver, method)

        def failing(target, *args, **kwargs):
            if target != host:
                return real(target, *args, **kwargs)
            del self.driver.__dict__[method]
            if when == "after":
                real(target, *args, **kwargs)
            raise exceptions.DriverError(f"injected failure {when} {method} on {host}")
        setattr(self.driver, method, failing)

    def host_state(self, host):
        store = HostStorage(self.settings, host)
        held = store.attachments()
        root = str(self.storage / host)
        return {
            "vifs": sorted((dict(v, instance=uuid) for uuid, rec in held.items()
                            for v in rec["vifs"]), key=lambda v: v["port_id"]),
            "volumes": sorted((dict(v, instance=uuid) for uuid, rec in held.items()
                               for v in rec["volumes"]), key=lambda v: v["volume_id"]),
            "files": [{"path": f"{CONTRACT_ROOT}/{name}",
                       "disk_gb": self._size_gb(os.path.join(root, name)) or 0}
                      for name in sorted(os.listdir(root)) if not name.startswith(".")],
            "guests": [dict(g, **self.guest_flavor(host, g["uuid"]))
                       for g in self.driver.list_guests(host)],
        }


HARNESSES = {"fake": FakeHarness, "libvirt": LibvirtTestHarness}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request, tmp_path):
    return HARNESSES[request.param](tmp_path)


@pytest.fixture
def driver(harness):
    return harness.driver


def make_instance(uuid="c0ffee00-0000-4000-8000-000000000001", disk_gb=20,
                  volume_backed=False):
    return {"uuid": uuid, "name": f"vm-{uuid[:8]}", "memory_mb": 2048, "vcpus": 2,
            "disk_gb": disk_gb, "volume_backed": volume_backed}


@pytest.fixture(params=["local", "shared"])
def cloud(request, harness):
    """Two hosts (shared instance storage or not) and a guest on src."""
    group = "nfs-1" if request.param == "shared" else None
    harness.make_host("src", shared_storage=group)
    harness.make_host("dst", shared_storage=group)
    instance = make_instance()
    harness.make_guest("src", instance)
    return {"shared": group is not None, "instance": instance}


def run_checks(driver, instance, block_migration=None):
    dest_check = driver.check_can_live_migrate_destination(
        "dst", instance, driver.get_host_info("src"), block_migration)
    try:
        return driver.check_can_live_migrate_source("src", instance, dest_check)
    finally:
        driver.cleanup_live_migration_destination_check("dst", instance, dest_check)


def wait_for_job(driver, instance, polls=500):
    for _ in range(polls):
        job = driver.get_migration_job("src", instance)
        if job["status"] != "running":
            return job
    pytest.fail(f"migration still running after {polls} polls: {job}")


class TestComputeDriverContract:
    def test_host_info_and_guests(self, driver, cloud):
        info = driver.get_host_info("src")
        assert set(info) == {"hypervisor_type", "hypervisor_version", "cpu_model",
                             "cpu_features", "memory_mb", "memory_free_mb", "disk_gb",
                             "disk_free_gb"}
        assert isinstance(info["hypervisor_version"], int)
        assert info["memory_free_mb"] <= info["memory_mb"] - 2048
        uuid = cloud["instance"]["uuid"]
        guest = driver.get_guest("src", uuid)
        assert guest == {"uuid": uuid, "name": cloud["instance"]["name"],
                         "state": "running", "persistent": True}
        assert driver.list_guests("src") == [guest]
        assert driver.get_guest("dst", uuid) is None
        with pytest.raises(exceptions.HostNotFound):
            driver.get_host_info("no-such-host")

    def test_check_pair_makes_and_removes_the_probe(self, harness, driver, cloud):
        instance = cloud["instance"]
        dest_check = driver.check_can_live_migrate_destination(
            "dst", instance, driver.get_host_info("src"), None)
        assert set(dest_check) == {"dest", "probe_file", "disk_available_gb",
                                   "block_migration"}
        assert harness.path_exists("dst", dest_check["probe_file"])
        assert harness.path_exists("src", dest_check["probe_file"]) is cloud["shared"]
        driver.cleanup_live_migration_destination_check("dst", instance, dest_check)
        driver.cleanup_live_migration_destination_check("dst", instance, dest_check)
        assert not harness.path_exists("dst", dest_check["probe_file"])

    def test_destination_check_cleanup_without_the_checks_reply(self, harness, cloud):
        driver, instance = harness.driver, cloud["instance"]
        dest_check = driver.check_can_live_migrate_destination(
            "dst", instance, driver.get_host_info("src"), None)
        driver.cleanup_live_migration_destination_check("dst", instance, None)
        assert not harness.path_exists("dst", dest_check["probe_file"])

    def test_source_check_decides_block_migration(self, driver, cloud):
        migrate_data = run_checks(driver, cloud["instance"])
        assert migrate_data == {"source": "src", "dest": "dst",
                                "block_migration": not cloud["shared"],
                                "is_shared_instance_path": cloud["shared"]}

    def test_storage_errors(self, driver, cloud):
        instance = cloud["instance"]
        if cloud["shared"]:
            with pytest.raises(exceptions.InvalidSharedStorage):
                run_checks(driver, instance, block_migration=True)
        else:
            with pytest.raises(exceptions.InvalidLocalStorage):
                run_checks(driver, instance, block_migration=False)
            volume_backed = dict(instance, volume_backed=True)
            assert run_checks(driver, volume_backed, False)["block_migration"] is False

    def test_block_migration_needs_disk_on_destination(self, harness, driver):
        harness.make_host("src")
        harness.make_host("dst", disk_gb=10)
        instance = make_instance(disk_gb=20)
        harness.make_guest("src", instance)
        with pytest.raises(exceptions.InsufficientResources):
            run_checks(driver, instance, block_migration=True)
        with pytest.raises(exceptions.InsufficientResources):
            run_checks(driver, instance, block_migration=None)

    def test_cpu_incompatibility(self, harness, driver):
        harness.require("cpu_features")
        harness.make_host("src", cpu_features=["sse4.2", "avx", "avx2"])
        harness.make_host("dst", cpu_features=["sse4.2", "avx"])
        instance = make_instance()
        harness.make_guest("src", instance)
        before = harness.host_state("dst")
        with pytest.raises(exceptions.CPUIncompatible, match="avx2"):
            driver.compare_cpu("dst", driver.get_host_info("src"))
        with pytest.raises(exceptions.CPUIncompatible, match="avx2"):
            run_checks(driver, instance)
        assert harness.host_state("dst") == before
        driver.compare_cpu("src", driver.get_host_info("dst"))   # subset is fine

    def test_pre_live_migration_and_rollback_restore_the_destination(
            self, harness, driver, cloud):
        instance = cloud["instance"]
        migrate_data = run_checks(driver, instance)
        before = harness.host_state("dst")
        for _ in range(2):
            result = driver.pre_live_migration("dst", instance, BDI, NET, migrate_data)
        assert result["dest"] == "dst"
        prepared = harness.host_state("dst")
        assert [v["port_id"] for v in prepared["vifs"]] == [NET[0]["port_id"]]
        assert [v["volume_id"] for v in prepared["volumes"]] == [BDI[0]["volume_id"]]
        assert harness.path_exists("dst", f"/var/lib/migrateflow/instances/{instance['uuid']}")
        for _ in range(2):
            driver.rollback_live_migration_at_destination("dst", instance, BDI, NET,
                                                          migrate_data)
        assert harness.host_state("dst") == before
        assert driver.get_guest("src", instance["uuid"])["state"] == "running"

    def test_rollback_removes_a_partial_incoming_guest(self, harness, driver, cloud):
        instance = cloud["instance"]
        migrate_data = run_checks(driver, instance)
        before = harness.host_state("dst")
        driver.pre_live_migration("dst", instance, BDI, NET, migrate_data)
        harness.require("migrate")
        harness.set_dirty_rate(instance["uuid"], 4096)
        driver.live_migration("src", instance, "dst", migrate_data, PARAMS)
        driver.rollback_live_migration_at_destination("dst", instance, BDI, NET, migrate_data)
        assert harness.host_state("dst") == before
        assert wait_for_job(driver, instance)["status"] == "failed"
        assert driver.get_guest("src", instance["uuid"])["state"] == "running"

    def test_full_live_migration(self, harness, driver, cloud):
        instance, uuid = cloud["instance"], cloud["instance"]["uuid"]
        migrate_data = run_checks(driver, instance)
        migrate_data = driver.pre_live_migration("dst", instance, BDI, NET, migrate_data)
        harness.require("migrate")
        driver.live_migration("src", instance, "dst", migrate_data, PARAMS)
        driver.live_migration("src", instance, "dst", migrate_data, PARAMS)  # re-attach
        job = wait_for_job(driver, instance)
        assert job["status"] == "completed"
        assert job["memory_processed_mb"] >= job["memory_total_mb"]
        assert job["downtime_ms"] is not None
        assert driver.get_guest("src", uuid) is None
        for _ in range(2):
            driver.post_live_migration_at_source("src", instance, BDI, NET)
            state = driver.post_live_migration_at_destination(
                "dst", instance, NET, migrate_data["block_migration"])
        assert state == "running"
        driver.cleanup("src", instance, destroy_disks=True)
        driver.cleanup("src", instance, destroy_disks=True)
        src = harness.host_state("src")
        assert src["vifs"] == src["volumes"] == src["guests"] == []
        assert harness.path_exists("src", f"/var/lib/migrateflow/instances/{uuid}") is \
            cloud["shared"]
        assert driver.get_guest("dst", uuid) == {"uuid": uuid, "name": instance["name"],
                                                 "state": "running", "persistent": True}
        dst = harness.host_state("dst")
        assert len(dst["vifs"]) == len(dst["volumes"]) == 1

    def test_abort_keeps_the_guest_on_the_source(self, harness, driver, cloud):
        instance, uuid = cloud["instance"], cloud["instance"]["uuid"]
        driver.live_migration_abort("src", instance)                  # no job: no-op
        migrate_data = run_checks(driver, instance)
        driver.pre_live_migration("dst", instance, BDI, NET, migrate_data)
        harness.require("migrate")
        harness.set_dirty_rate(uuid, 4096)
        driver.live_migration("src", instance, "dst", migrate_data, PARAMS)
        driver.get_migration_job("src", instance)
        driver.live_migration_abort("src", instance)
        driver.live_migration_abort("src", instance)
        assert wait_for_job(driver, instance)["status"] == "cancelled"
        assert driver.get_guest("src", uuid)["state"] == "running"
        assert driver.get_guest("dst", uuid) is None

    def test_post_at_source_refuses_a_running_guest(self, driver, cloud):
        with pytest.raises(exceptions.DriverError):
            driver.post_live_migration_at_source("src", cloud["instance"], BDI, NET)
        assert driver.get_guest("src", cloud["instance"]["uuid"])["state"] == "running"

    def test_spawn_and_destroy_are_idempotent(self, harness, driver, cloud):
        before = harness.host_state("dst")
        instance = make_instance("c0ffee00-0000-4000-8000-000000000002")
        for _ in range(2):
            driver.spawn("dst", instance, [], [])
        assert driver.get_guest("dst", instance["uuid"])["state"] == "running"
        for _ in range(2):
            driver.destroy("dst", instance, destroy_disks=True)
        assert harness.host_state("dst") == before


# -- cold migration / resize ------------------------------------------------------------

OLD_FLAVOR = {"name": "m1.small", "memory_mb": 2048, "vcpus": 2, "disk_gb": 20}
NEW_FLAVOR = {"name": "m1.large", "memory_mb": 8192, "vcpus": 4, "disk_gb": 40}


def disk_path(instance):
    return f"/var/lib/migrateflow/instances/{instance['uuid']}"


def flavor_of(flavor):
    return {k: flavor[k] for k in ("memory_mb", "vcpus", "disk_gb")}


def snapshot(harness):
    return {host: harness.host_state(host) for host in ("src", "dst")}


def resize_steps(driver, instance, shared, flavor=NEW_FLAVOR):
    """(name, call) of the resize steps up to the guest running on dst."""
    return [
        ("migrate_disk_and_power_off", lambda: driver.migrate_disk_and_power_off(
            "src", instance, "dst", flavor, NET, BDI, shared)),
        ("finish_migration", lambda: driver.finish_migration(
            "dst", instance, flavor, NET, BDI, True)),
    ]


def resize(driver, instance, shared, flavor=NEW_FLAVOR):
    for _, step in resize_steps(driver, instance, shared, flavor):
        step()


class TestColdMigrationContract:
    def test_power_off_and_on_are_idempotent(self, harness, driver, cloud):
        uuid = cloud["instance"]["uuid"]
        for _ in range(2):
            driver.power_off("src", cloud["instance"])
        assert driver.get_guest("src", uuid)["state"] == "shutdown"
        assert driver.get_guest("src", uuid)["persistent"] is True
        for _ in range(2):
            driver.power_on("src", cloud["instance"])
        assert driver.get_guest("src", uuid)["state"] == "running"
        with pytest.raises(exceptions.DriverError):
            driver.power_on("dst", cloud["instance"])

    def test_shared_storage_check_leaves_nothing_behind(self, harness, driver, cloud):
        before = snapshot(harness)
        for _ in range(2):
            assert driver.check_instance_shared_storage(
                "src", "dst", cloud["instance"]) is cloud["shared"]
            assert driver.check_instance_shared_storage(
                "dst", "src", cloud["instance"]) is cloud["shared"]
        assert snapshot(harness) == before

    def test_resize_then_confirm(self, harness, driver, cloud):
        instance, uuid, shared = cloud["instance"], cloud["instance"]["uuid"], cloud["shared"]
        assert driver.check_instance_shared_storage("src", "dst", instance) is shared
        result = driver.migrate_disk_and_power_off("src", instance, "dst", NEW_FLAVOR,
                                                   NET, BDI, shared)
        assert result == {"disk_info": [{"path": harness.host_path("dst", disk_path(instance)),
                                         "disk_gb": 40,
                                         "copied": not shared}]}
        assert driver.get_guest("src", uuid)["state"] == "shutdown"
        src = harness.host_state("src")
        assert src["vifs"] == src["volumes"] == []
        # the disk is copied with the new size only when the storage is not shared
        assert harness.disk_gb("dst", disk_path(instance)) == (20 if shared else 40)
        assert harness.disk_gb("src", disk_path(instance)) == 20

        assert driver.finish_migration("dst", instance, NEW_FLAVOR, NET, BDI, True) == \
            "running"
        assert driver.get_guest("dst", uuid) == {"uuid": uuid, "name": instance["name"],
                                                 "state": "running", "persistent": True}
        assert harness.guest_flavor("dst", uuid) == flavor_of(NEW_FLAVOR)
        dst = harness.host_state("dst")
        assert [v["port_id"] for v in dst["vifs"]] == [NET[0]["port_id"]]
        assert [v["volume_id"] for v in dst["volumes"]] == [BDI[0]["volume_id"]]
        # until confirm the old guest stays defined (powered off) on the source
        assert driver.get_guest("src", uuid)["state"] == "shutdown"
        assert harness.guest_flavor("src", uuid) == flavor_of(OLD_FLAVOR)

        driver.confirm_migration("src", instance, shared)
        src = harness.host_state("src")
        assert src["vifs"] == src["volumes"] == src["guests"] == []
        # confirm keeps a shared disk (it is the destination's disk too)
        assert harness.path_exists("src", disk_path(instance)) is shared
        assert driver.get_guest("dst", uuid)["state"] == "running"
        assert harness.disk_gb("dst", disk_path(instance)) == (20 if shared else 40)

    def test_resize_then_revert_restores_both_hosts(self, harness, driver, cloud):
        instance, uuid, shared = cloud["instance"], cloud["instance"]["uuid"], cloud["shared"]
        before = snapshot(harness)
        resize(driver, instance, shared)
        state = driver.finish_revert_migration("dst", "src", instance, OLD_FLAVOR, NET, BDI,
                                               True)
        assert state == "running"
        assert driver.get_guest("dst", uuid) is None
        assert driver.get_guest("src", uuid)["state"] == "running"
        assert harness.guest_flavor("src", uuid) == flavor_of(OLD_FLAVOR)
        src = harness.host_state("src")
        assert len(src["vifs"]) == len(src["volumes"]) == 1
        assert snapshot(harness) == before

    def test_revert_without_power_on_leaves_the_source_off(self, harness, driver, cloud):
        instance = cloud["instance"]
        resize(driver, instance, cloud["shared"])
        assert driver.finish_revert_migration("dst", "src", instance, OLD_FLAVOR, NET, BDI,
                                              False) == "shutdown"
        assert driver.get_guest("src", instance["uuid"])["state"] == "shutdown"
        assert driver.get_guest("dst", instance["uuid"]) is None

    def test_finish_without_power_on_defines_a_stopped_guest(self, harness, driver, cloud):
        instance = cloud["instance"]
        driver.migrate_disk_and_power_off("src", instance, "dst", NEW_FLAVOR, NET, BDI,
                                          cloud["shared"])
        assert driver.finish_migration("dst", instance, NEW_FLAVOR, NET, BDI, False) == \
            "shutdown"
        assert driver.get_guest("dst", instance["uuid"])["state"] == "shutdown"

    @pytest.mark.parametrize("ending", ["confirm", "revert"])
    def test_each_step_twice_is_once(self, harness, driver, cloud, ending):
        instance, shared = cloud["instance"], cloud["shared"]
        steps = resize_steps(driver, instance, shared)
        if ending == "confirm":
            steps.append(("confirm_migration",
                          lambda: driver.confirm_migration("src", instance, shared)))
        else:
            steps.append(("finish_revert_migration", lambda: driver.finish_revert_migration(
                "dst", "src", instance, OLD_FLAVOR, NET, BDI, True)))
        for name, step in steps:
            first = step()
            after_once = snapshot(harness)
            assert step() == first, name
            assert snapshot(harness) == after_once, name

    def test_shrinking_the_disk_is_refused(self, harness, driver, cloud):
        before = snapshot(harness)
        small = dict(NEW_FLAVOR, name="m1.tiny", disk_gb=10)
        with pytest.raises(exceptions.MigrationPreCheckError, match="cannot shrink"):
            driver.migrate_disk_and_power_off("src", cloud["instance"], "dst", small, NET,
                                              BDI, cloud["shared"])
        assert snapshot(harness) == before

    def test_copy_needs_free_disk_on_the_destination(self, harness, driver):
        harness.make_host("src")
        harness.make_host("dst", disk_gb=30)
        instance = make_instance(disk_gb=20)
        harness.make_guest("src", instance)
        before = snapshot(harness)
        with pytest.raises(exceptions.InsufficientResources):
            driver.migrate_disk_and_power_off("src", instance, "dst", NEW_FLAVOR, NET, BDI,
                                              False)
        assert snapshot(harness) == before

    def test_finish_needs_the_disk_on_the_destination(self, harness, driver):
        harness.make_host("src")
        harness.make_host("dst")
        instance = make_instance()
        harness.make_guest("src", instance)
        before = snapshot(harness)
        with pytest.raises(exceptions.DriverError):
            driver.finish_migration("dst", instance, NEW_FLAVOR, NET, BDI, True)
        assert snapshot(harness) == before

    @pytest.mark.parametrize("method, when", [
        ("migrate_disk_and_power_off", "before"), ("migrate_disk_and_power_off", "after"),
        ("finish_migration", "before"), ("finish_migration", "after")])
    def test_cleanup_after_a_failed_step_restores_the_destination(
            self, harness, driver, cloud, method, when):
        instance, shared = cloud["instance"], cloud["shared"]
        before = snapshot(harness)
        harness.inject_failure(method, "dst" if method == "finish_migration" else "src",
                               when)
        with pytest.raises(exceptions.DriverError):
            resize(driver, instance, shared)
        for _ in range(2):
            driver.cleanup_migration_destination("dst", instance, shared)
        assert harness.host_state("dst") == before["dst"]
        # the source side is brought back by the revert, which finds dst clean
        driver.finish_revert_migration("dst", "src", instance, OLD_FLAVOR, NET, BDI, True)
        assert snapshot(harness) == before

    def test_cleanup_never_removes_the_only_copy(self, harness, driver, cloud):
        instance, shared = cloud["instance"], cloud["shared"]
        resize(driver, instance, shared)
        driver.confirm_migration("src", instance, shared)
        after_confirm = snapshot(harness)
        driver.cleanup_migration_destination("dst", instance, shared)
        assert snapshot(harness) == after_confirm
        assert driver.get_guest("dst", instance["uuid"])["state"] == "running"

    def test_confirm_refuses_a_running_source_guest(self, harness, driver, cloud):
        before = snapshot(harness)
        with pytest.raises(exceptions.DriverError):
            driver.confirm_migration("src", cloud["instance"], cloud["shared"])
        assert snapshot(harness) == before

    def test_revert_after_confirm_is_refused(self, harness, driver, cloud):
        instance, shared = cloud["instance"], cloud["shared"]
        resize(driver, instance, shared)
        driver.confirm_migration("src", instance, shared)
        after_confirm = snapshot(harness)
        with pytest.raises(exceptions.DriverError):
            driver.finish_revert_migration("dst", "src", instance, OLD_FLAVOR, NET, BDI,
                                           True)
        assert snapshot(harness) == after_confirm


class TestSameHostResizeContract:
    """allow_resize_to_same_host: source and destination are one host."""

    @pytest.fixture
    def guest(self, harness):
        harness.make_host("src")
        harness.make_host("dst")
        instance = make_instance()
        harness.make_guest("src", instance)
        return instance

    def _resize(self, driver, instance):
        driver.migrate_disk_and_power_off("src", instance, "src", NEW_FLAVOR, NET, BDI,
                                          False)
        return driver.finish_migration("src", instance, NEW_FLAVOR, NET, BDI, True)

    def test_resize_then_confirm_keeps_the_resized_guest(self, harness, driver, guest):
        uuid = guest["uuid"]
        assert self._resize(driver, guest) == "running"
        assert harness.guest_flavor("src", uuid) == flavor_of(NEW_FLAVOR)
        assert harness.disk_gb("src", disk_path(guest)) == 40
        for _ in range(2):
            driver.confirm_migration("src", guest, False, dest="src")
        assert driver.get_guest("src", uuid)["state"] == "running"
        assert harness.guest_flavor("src", uuid) == flavor_of(NEW_FLAVOR)
        assert [f["path"] for f in harness.host_state("src")["files"]] == [disk_path(guest)]
        assert harness.host_state("dst")["guests"] == []

    def test_resize_then_revert_restores_the_old_disk_and_flavor(self, harness, driver,
                                                                  guest):
        before = snapshot(harness)
        self._resize(driver, guest)
        for _ in range(2):
            assert driver.finish_revert_migration("src", "src", guest, OLD_FLAVOR, NET, BDI,
                                                  True) == "running"
        assert snapshot(harness) == before

    def test_each_step_twice_is_once(self, harness, driver, guest):
        first = driver.migrate_disk_and_power_off("src", guest, "src", NEW_FLAVOR, NET, BDI,
                                                  False)
        once = snapshot(harness)
        assert driver.migrate_disk_and_power_off("src", guest, "src", NEW_FLAVOR, NET, BDI,
                                                 False) == first
        assert snapshot(harness) == once


class TestEvacuationContract:
    """The source is down; the guest is rebuilt on the destination."""

    def test_instance_on_disk_follows_the_storage(self, harness, driver, cloud):
        instance = cloud["instance"]
        assert driver.instance_on_disk("dst", instance) is cloud["shared"]
        assert driver.instance_on_disk("src", instance) is True

    @pytest.mark.parametrize("power_on, state", [(True, "running"), (False, "shutdown")])
    def test_rebuild_on_the_destination(self, harness, driver, cloud, power_on, state):
        instance, uuid, shared = cloud["instance"], cloud["instance"]["uuid"], cloud["shared"]
        for _ in range(2):
            assert driver.rebuild("dst", instance, "image-1", NET, BDI, shared,
                                  power_on) == state
        assert driver.get_guest("dst", uuid) == {"uuid": uuid, "name": instance["name"],
                                                 "state": state, "persistent": True}
        dst = harness.host_state("dst")
        assert [v["port_id"] for v in dst["vifs"]] == [NET[0]["port_id"]]
        assert [v["volume_id"] for v in dst["volumes"]] == [BDI[0]["volume_id"]]
        assert harness.path_exists("dst", disk_path(instance))

    def test_rebuild_on_shared_storage_needs_the_disk_there(self, harness, driver):
        harness.make_host("src")
        harness.make_host("dst")
        instance = make_instance()
        harness.make_guest("src", instance)
        with pytest.raises(exceptions.DriverError, match="not on shared storage"):
            driver.rebuild("dst", instance, "image-1", NET, BDI, True, True)
        assert driver.get_guest("dst", instance["uuid"]) is None

    def test_destroy_undoes_a_rebuild(self, harness, driver, cloud):
        instance, shared = cloud["instance"], cloud["shared"]
        before = harness.host_state("dst")
        driver.rebuild("dst", instance, "image-1", NET, BDI, shared, True)
        driver.destroy("dst", instance, destroy_disks=not shared)
        after = harness.host_state("dst")
        if shared:  # the shared disk is the source's too: kept
            assert after == before
        else:
            assert after == {"vifs": [], "volumes": [], "files": [], "guests": []}
