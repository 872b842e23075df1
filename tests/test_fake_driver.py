"""FakeDriver's own behaviour: the migration model, faults, sharing, counters.

Every test uses a real SQLite file in tmp_path; processes are real processes.
"""
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from oslo_config import cfg

from migrateflow import exceptions
from migrateflow.conf import compute as compute_conf
from migrateflow.conf import fake_driver as fake_driver_conf
from migrateflow.drivers import get_driver, reset_cache
from migrateflow.drivers.fake import FakeDriver

NET = [{"port_id": "9f0c3c1e-5b8a-4c6e-9d51-0f8f2c1a7b11", "mac": "fa:16:3e:00:00:01",
        "network_id": "net-1"}]
BDI = [{"volume_id": "vol-1", "device": "/dev/vdb"}]
PARAMS = {"bandwidth_mbps": 0, "downtime_ms": 500, "auto_converge": False,
          "post_copy": False}
SMALL = {"name": "m1.medium", "memory_mb": 4096, "vcpus": 2, "disk_gb": 20}
BIG = {"name": "m1.large", "memory_mb": 8192, "vcpus": 4, "disk_gb": 40}
DISK = "/var/lib/migrateflow/instances/inst-1"


def make_instance(uuid="inst-1", memory_mb=4096, disk_gb=20, volume_backed=False):
    return {"uuid": uuid, "name": f"vm-{uuid}", "memory_mb": memory_mb, "vcpus": 2,
            "disk_gb": disk_gb, "volume_backed": volume_backed}


@pytest.fixture
def state_file(tmp_path):
    return str(tmp_path / "hv.sqlite")


@pytest.fixture
def driver(state_file):
    drv = FakeDriver(state_file)
    drv.add_host("src")
    drv.add_host("dst")
    return drv


@pytest.fixture
def inst(driver):
    """A running guest on src with one VIF and one volume."""
    instance = make_instance()
    driver.spawn("src", instance, NET, BDI)
    return instance


def start(driver, instance, dirty_rate=0.0, **params):
    driver.set_dirty_rate(instance["uuid"], dirty_rate)
    driver.live_migration("src", instance, "dst", {}, dict(PARAMS, **params))


def poll(driver, instance, limit=200):
    """Poll like a monitor does; returns (last job, number of polls)."""
    for polls in range(1, limit + 1):
        job = driver.get_migration_job("src", instance)
        if job["status"] != "running":
            return job, polls
    return job, limit


def placement(driver, uuid):
    """{host: state} of every copy of the guest."""
    return {host: guest["state"] for host in ("src", "dst")
            for guest in driver.guests(host) if guest["uuid"] == uuid}


def run_child(state_file, body):
    """Run ``body`` in a fresh Python process with ``drv`` bound to the file."""
    script = (f"from migrateflow.drivers.fake import FakeDriver\n"
              f"drv = FakeDriver({state_file!r})\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=60)


# -- the migration model --------------------------------------------------------

def test_idle_guest_converges_in_few_iterations(driver, inst):
    start(driver, inst)
    assert driver.get_guest("dst", inst["uuid"])["state"] == "paused"
    job, polls = poll(driver, inst)
    assert job["status"] == "completed" and polls <= 3
    assert job["downtime_ms"] <= PARAMS["downtime_ms"]
    assert placement(driver, inst["uuid"]) == {"dst": "running"}
    assert driver.get_guest("dst", inst["uuid"])["persistent"] is True


def test_iterations_follow_the_precopy_formula(driver, inst):
    # M=4096, B=1024, D=256: copies 4096 (4 s) -> 1024 dirty, 1024 (1 s) -> 256
    # dirty, 256 MiB fit in 250 ms <= 500 ms: stop-and-copy.
    start(driver, inst, dirty_rate=256)
    first = driver.get_migration_job("src", inst)
    assert (first["iteration"], first["memory_remaining_mb"], first["time_elapsed"]) == (
        1, 1024, 4.0)
    job, _ = poll(driver, inst)
    assert job["status"] == "completed" and job["iteration"] == 3
    assert job["memory_processed_mb"] == 4096 + 1024 + 256
    assert job["time_elapsed"] == pytest.approx(5.25)
    assert job["downtime_ms"] == pytest.approx(255)


def test_dirty_rate_at_bandwidth_never_converges(driver, inst):
    start(driver, inst, dirty_rate=1024)
    job, polls = poll(driver, inst, limit=200)
    assert job["status"] == "running" and job["iteration"] == 200
    assert job["memory_remaining_mb"] == 4096 and job["throttle_pct"] == 0


def test_auto_converge_throttles_until_it_converges(driver, inst):
    start(driver, inst, dirty_rate=2048, auto_converge=True)
    throttles = []
    for _ in range(200):
        job = driver.get_migration_job("src", inst)
        throttles.append(job["throttle_pct"])
        if job["status"] != "running":
            break
    assert job["status"] == "completed" and job["downtime_ms"] <= 500
    assert throttles[0] == 20 and max(throttles) > 20
    assert throttles == sorted(throttles)


def test_raising_the_downtime_lets_a_stuck_job_finish(driver, inst):
    start(driver, inst, dirty_rate=1024)
    poll(driver, inst, limit=5)
    driver.live_migration_set_downtime("src", inst, 4000)
    job = driver.get_migration_job("src", inst)
    assert job["status"] == "completed" and job["downtime_ms"] == pytest.approx(4005)


def test_post_copy_force_complete(driver, inst):
    start(driver, inst, dirty_rate=2048, post_copy=True)
    poll(driver, inst, limit=3)
    driver.live_migration_force_complete("src", inst)
    assert placement(driver, inst["uuid"]) == {"src": "paused", "dst": "running"}
    job = driver.get_migration_job("src", inst)
    assert job["status"] == "completed" and job["post_copy"] is True
    assert job["downtime_ms"] == pytest.approx(5)
    assert placement(driver, inst["uuid"]) == {"dst": "running"}


def test_force_complete_without_post_copy_pauses_and_converges(driver, inst):
    start(driver, inst, dirty_rate=2048)
    poll(driver, inst, limit=3)
    driver.live_migration_force_complete("src", inst)
    assert driver.get_guest("src", inst["uuid"])["state"] == "paused"
    job, polls = poll(driver, inst, limit=10)
    assert job["status"] == "completed" and polls <= 2 and job["post_copy"] is False
    assert placement(driver, inst["uuid"]) == {"dst": "running"}


def test_abort_keeps_the_guest_on_the_source(driver, inst):
    start(driver, inst, dirty_rate=2048)
    driver.live_migration_force_complete("src", inst)     # pauses the source
    driver.live_migration_abort("src", inst)
    assert placement(driver, inst["uuid"]) == {"src": "running"}
    assert driver.get_migration_job("src", inst)["status"] == "cancelled"
    driver.live_migration_abort("src", inst)              # nothing left to do
    assert driver.side_effects(inst["uuid"])[("live_migration_abort", "src")] == 1


def test_abort_after_post_copy_switch_is_refused(driver, inst):
    start(driver, inst, dirty_rate=2048, post_copy=True)
    driver.live_migration_force_complete("src", inst)
    with pytest.raises(exceptions.InvalidMigrationState):
        driver.live_migration_abort("src", inst)
    assert poll(driver, inst)[0]["status"] == "completed"


def test_live_migration_reattaches_and_validates(driver, inst):
    start(driver, inst, dirty_rate=2048)
    driver.live_migration("src", inst, "dst", {}, PARAMS)
    assert driver.side_effects(inst["uuid"])[("live_migration", "src")] == 1
    driver.set_dirty_rate(inst["uuid"], 0)
    poll(driver, inst)
    driver.live_migration("src", inst, "dst", {}, PARAMS)  # already runs on dst
    assert driver.get_migration_job("src", inst)["status"] == "completed"
    with pytest.raises(exceptions.DriverError, match="ghost is not running on src"):
        driver.live_migration("src", make_instance("ghost"), "dst", {}, PARAMS)


def test_job_fails_when_the_destination_goes_down(driver, inst):
    start(driver, inst, dirty_rate=2048)
    driver.set_host_up("dst", False)
    job = driver.get_migration_job("src", inst)
    assert job["status"] == "failed" and "dst is unreachable" in job["error"]
    assert driver.get_guest("src", inst["uuid"])["state"] == "running"
    assert [e["event"] for e in driver.timeline(inst["uuid"])][-1] == "migration.failed"


def test_time_scale_makes_polls_take_wall_time(state_file, driver, inst):
    scaled = FakeDriver(state_file, time_scale=0.05)
    start(scaled, inst)
    began = time.monotonic()
    job = scaled.get_migration_job("src", inst)            # copies 4096 MiB: 4 s
    assert job["time_elapsed"] == 4.0
    assert time.monotonic() - began >= 0.2


def test_timeline_orders_job_start_and_end(driver, inst):
    start(driver, inst)
    poll(driver, inst)
    events = driver.timeline(inst["uuid"])
    names = [e["event"] for e in events]
    assert names == ["spawn", "live_migration", "migration.started", "migration.completed"]
    times = [e["time"] for e in events]
    assert times == sorted(times)
    assert {e["instance"] for e in events} == {inst["uuid"]}


# -- fault injection -----------------------------------------------------------------

def test_raise_before_skips_the_side_effect(driver, inst):
    driver.inject_fault("pre_live_migration", host="dst", message="boom")
    with pytest.raises(exceptions.InjectedFault, match="boom"):
        driver.pre_live_migration("dst", inst, BDI, NET, {})
    assert driver.vifs("dst") == []
    driver.pre_live_migration("dst", inst, BDI, NET, {})   # count=1: spent
    assert len(driver.vifs("dst")) == 1


def test_raise_after_commits_the_side_effect(driver, inst):
    driver.inject_fault("pre_live_migration", when="after")
    with pytest.raises(exceptions.InjectedFault, match="pre_live_migration on dst"):
        driver.pre_live_migration("dst", inst, BDI, NET, {})
    assert len(driver.vifs("dst")) == 1


def test_faults_match_host_and_instance_and_count(driver, inst):
    other = make_instance("inst-2")
    driver.inject_fault("spawn", host="dst", instance="inst-2", count=-1)
    driver.spawn("src", other, [], [])                     # other host: no fault
    for _ in range(3):
        with pytest.raises(exceptions.InjectedFault):
            driver.spawn("dst", other, [], [])
    driver.clear_faults()
    driver.spawn("dst", other, [], [])
    driver.inject_fault("get_host_info", count=2)
    outcomes = []
    for _ in range(3):
        try:
            driver.get_host_info("src")
            outcomes.append("ok")
        except exceptions.InjectedFault:
            outcomes.append("fault")
    assert outcomes == ["fault", "fault", "ok"]
    with pytest.raises(ValueError):
        driver.inject_fault("no_such_method")


def _call_in_thread(fn, *args):
    outcome = {}

    def target():
        try:
            outcome["result"] = fn(*args)
        except Exception as exc:  # handed to the test thread
            outcome["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_hang_is_released_by_release_hangs_from_another_driver(state_file, driver, inst):
    driver.inject_fault("pre_live_migration", action="hang")
    thread, outcome = _call_in_thread(driver.pre_live_migration, "dst", inst, BDI, NET, {})
    thread.join(0.3)
    assert thread.is_alive()
    FakeDriver(state_file).release_hangs()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], exceptions.InjectedFault)
    assert "hang released" in str(outcome["error"])


def test_hang_is_released_by_aborting_the_job(driver, inst):
    start(driver, inst, dirty_rate=2048)
    driver.inject_fault("live_migration_set_downtime", action="hang")
    thread, outcome = _call_in_thread(driver.live_migration_set_downtime, "src", inst, 900)
    thread.join(0.3)
    assert thread.is_alive()
    driver.live_migration_abort("src", inst)
    thread.join(5)
    assert isinstance(outcome["error"], exceptions.InjectedFault)
    assert placement(driver, inst["uuid"]) == {"src": "running"}


def test_hang_on_get_migration_job_stalls_until_abort(driver, inst):
    start(driver, inst)
    driver.inject_fault("get_migration_job", action="hang", count=-1)
    jobs = [driver.get_migration_job("src", inst) for _ in range(5)]
    assert all(job == jobs[0] for job in jobs)
    assert jobs[0]["status"] == "running" and jobs[0]["iteration"] == 0
    driver.live_migration_abort("src", inst)
    assert driver.get_migration_job("src", inst)["status"] == "cancelled"


@pytest.mark.parametrize("when, committed", [("before", False), ("after", True)])
def test_kill_takes_the_process_down(state_file, driver, inst, when, committed):
    driver.inject_fault("pre_live_migration", action="kill", when=when)
    child = run_child(state_file, f"""
        drv.pre_live_migration("dst", {inst!r}, {BDI!r}, {NET!r}, {{}})
        print("survived")
    """)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "survived" not in child.stdout
    assert bool(driver.vifs("dst")) is committed


# -- shared state ---------------------------------------------------------------------

def test_two_driver_objects_share_the_file(state_file, driver, inst):
    other = FakeDriver(state_file)
    assert other.get_guest("src", inst["uuid"])["state"] == "running"
    other.set_host_up("src", False)
    with pytest.raises(exceptions.DriverError, match="host src is unreachable"):
        driver.get_guest("src", inst["uuid"])


def test_processes_share_state_and_serialise_writes(state_file, driver):
    body = """
        import sys
        for i in range(15):
            inst = {{"uuid": "{tag}-%d" % i, "name": "vm", "memory_mb": 512, "vcpus": 1,
                     "disk_gb": 1, "volume_backed": False}}
            drv.spawn("src", inst, [], [])
        print(len(drv.list_guests("src")))
    """
    children = [subprocess.Popen(
        [sys.executable, "-c", "from migrateflow.drivers.fake import FakeDriver\n"
         f"drv = FakeDriver({state_file!r})\n" + textwrap.dedent(body.format(tag=tag))],
        stdout=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for child in children:
        child.communicate(timeout=60)
        assert child.returncode == 0
    assert len(driver.list_guests("src")) == 30
    assert sum(n for key, n in driver.counters().items() if key[0] == "spawn") == 30
    assert driver.get_host_info("src")["disk_free_gb"] == 1000 - 30


def test_child_process_sees_faults_and_state_of_the_parent(state_file, driver, inst):
    driver.inject_fault("get_guest", message="from parent")
    child = run_child(state_file, f"""
        import json
        try:
            drv.get_guest("src", {inst['uuid']!r})
        except Exception as exc:
            print(json.dumps([type(exc).__name__, str(exc)]))
        print(json.dumps(drv.get_guest("src", {inst['uuid']!r})))
    """)
    fault, guest = [json.loads(line) for line in child.stdout.splitlines()]
    assert fault == ["InjectedFault", "from parent"]
    assert guest["state"] == "running"


# -- side-effect counters and unreachable hosts -------------------------------------

def twice(fn, *args):
    fn(*args)
    return fn(*args)


def test_counters_count_only_real_changes(driver, inst):
    uuid = inst["uuid"]
    check = twice(driver.check_can_live_migrate_destination, "dst", inst,
                  driver.get_host_info("src"), None)
    twice(driver.cleanup_live_migration_destination_check, "dst", inst, check)
    twice(driver.pre_live_migration, "dst", inst, BDI, NET, {})
    twice(driver.live_migration, "src", inst, "dst", {}, dict(PARAMS, post_copy=True))
    twice(driver.live_migration_set_downtime, "src", inst, 800)
    twice(driver.live_migration_force_complete, "src", inst)
    poll(driver, inst)
    twice(driver.post_live_migration_at_source, "src", inst, BDI, NET)
    twice(driver.post_live_migration_at_destination, "dst", inst, NET, False)
    twice(driver.cleanup, "src", inst, True)
    twice(driver.destroy, "dst", inst, True)
    twice(driver.spawn, "dst", inst, NET, BDI)
    expected = {(method, host, uuid): 1 for method, host in [
        ("spawn", "src"), ("check_can_live_migrate_destination", "dst"),
        ("cleanup_live_migration_destination_check", "dst"), ("pre_live_migration", "dst"),
        ("live_migration", "src"), ("live_migration_set_downtime", "src"),
        ("live_migration_force_complete", "src"), ("post_live_migration_at_source", "src"),
        ("cleanup", "src"), ("destroy", "dst"), ("spawn", "dst")]}
    # post-copy completion already made the destination guest persistent and running
    assert driver.counters() == expected
    assert driver.side_effects(uuid)[("spawn", "dst")] == 1


def test_rollback_and_abort_count_once(driver, inst):
    twice(driver.pre_live_migration, "dst", inst, BDI, NET, {})
    driver.live_migration("src", inst, "dst", {}, PARAMS)
    twice(driver.live_migration_abort, "src", inst)
    twice(driver.rollback_live_migration_at_destination, "dst", inst, BDI, NET, {})
    effects = driver.side_effects(inst["uuid"])
    assert effects[("live_migration_abort", "src")] == 1
    assert effects[("rollback_live_migration_at_destination", "dst")] == 1


@pytest.mark.parametrize("call", [
    lambda d, i: d.get_host_info("dst"),
    lambda d, i: d.compare_cpu("dst", d.get_host_info("src")),
    lambda d, i: d.list_guests("dst"),
    lambda d, i: d.get_guest("dst", i["uuid"]),
    lambda d, i: d.check_can_live_migrate_destination("dst", i, d.get_host_info("src"), None),
    lambda d, i: d.pre_live_migration("dst", i, BDI, NET, {}),
    lambda d, i: d.rollback_live_migration_at_destination("dst", i, BDI, NET, {}),
    lambda d, i: d.live_migration("src", i, "dst", {}, PARAMS),
    lambda d, i: d.post_live_migration_at_destination("dst", i, NET, False),
    lambda d, i: d.cleanup("dst", i, True),
    lambda d, i: d.spawn("dst", i, NET, BDI),
    lambda d, i: d.destroy("dst", i),
    lambda d, i: d.power_off("dst", i),
    lambda d, i: d.power_on("dst", i),
    lambda d, i: d.check_instance_shared_storage("src", "dst", i),
    lambda d, i: d.migrate_disk_and_power_off("src", i, "dst", BIG, NET, BDI, False),
    lambda d, i: d.finish_migration("dst", i, BIG, NET, BDI, True),
    lambda d, i: d.confirm_migration("dst", i, False),
    lambda d, i: d.finish_revert_migration("dst", "src", i, SMALL, NET, BDI, True),
    lambda d, i: d.cleanup_migration_destination("dst", i, False),
])
def test_down_host_is_unreachable(driver, inst, call):
    driver.set_host_up("dst", False)
    with pytest.raises(exceptions.DriverError, match="host dst is unreachable"):
        call(driver, inst)
    assert driver.counters() == {("spawn", "src", inst["uuid"]): 1}


def test_unknown_host(driver):
    with pytest.raises(exceptions.HostNotFound):
        driver.get_host_info("nowhere")
    with pytest.raises(exceptions.HostNotFound):
        driver.set_host_up("nowhere", True)


def test_add_host_is_an_upsert_and_reset_forgets_everything(driver, inst):
    driver.add_host("src", memory_mb=1024, cpu_features=["avx"])
    info = driver.get_host_info("src")
    assert (info["memory_mb"], info["cpu_features"], info["disk_gb"]) == (1024, ["avx"], 1000)
    assert info["memory_free_mb"] == 1024 - inst["memory_mb"]
    with pytest.raises(TypeError):
        driver.add_host("src", colour="blue")
    driver.reset()
    assert driver.counters() == {} and driver.timeline() == []
    with pytest.raises(exceptions.HostNotFound):
        driver.get_host_info("src")


# -- cold migration / resize -------------------------------------------------------------

def test_cold_migration_counters_count_only_real_changes(driver, inst):
    uuid = inst["uuid"]
    assert twice(driver.check_instance_shared_storage, "src", "dst", inst) is False
    twice(driver.migrate_disk_and_power_off, "src", inst, "dst", BIG, NET, BDI, False)
    twice(driver.finish_migration, "dst", inst, BIG, NET, BDI, True)
    twice(driver.confirm_migration, "src", inst, False)
    twice(driver.cleanup_migration_destination, "dst", inst, False)  # only copy: no-op
    twice(driver.power_off, "dst", inst)
    twice(driver.power_on, "dst", inst)
    # and back again, reverted this time
    twice(driver.migrate_disk_and_power_off, "dst", inst, "src", BIG, NET, BDI, False)
    twice(driver.finish_migration, "src", inst, BIG, NET, BDI, True)
    twice(driver.finish_revert_migration, "src", "dst", inst, BIG, NET, BDI, True)
    twice(driver.cleanup_migration_destination, "src", inst, False)   # nothing left
    expected = {(method, host, uuid): 1 for method, host in [
        ("spawn", "src"), ("migrate_disk_and_power_off", "src"), ("finish_migration", "dst"),
        ("confirm_migration", "src"), ("power_off", "dst"), ("power_on", "dst"),
        ("migrate_disk_and_power_off", "dst"), ("finish_migration", "src"),
        ("finish_revert_migration", "src")]}
    assert driver.counters() == expected
    assert placement(driver, uuid) == {"dst": "running"}
    assert [f["path"] for f in driver.files("src")] == []
    assert driver.files("dst") == [{"location": "host:dst", "path": DISK,
                                    "instance": uuid, "disk_gb": 40}]


def test_shared_storage_probe_is_uncounted_and_spares_the_live_probe(driver, inst):
    driver.add_host("nfs-a", shared_storage="nfs")
    driver.add_host("nfs-b", shared_storage="nfs")
    assert driver.check_instance_shared_storage("nfs-a", "nfs-b", inst) is True
    assert driver.check_instance_shared_storage("src", "nfs-b", inst) is False
    check = driver.check_can_live_migrate_destination("dst", inst,
                                                      driver.get_host_info("src"), None)
    driver.check_instance_shared_storage("src", "dst", inst)
    assert check["probe_file"] in [f["path"] for f in driver.files("dst")]
    assert driver.files("nfs-a") == []
    assert ("check_instance_shared_storage", "src", inst["uuid"]) not in driver.counters()


def test_resize_moves_the_resource_usage(driver, inst):
    driver.set_dirty_rate(inst["uuid"], 128)
    src_free = driver.get_host_info("src")["memory_free_mb"]
    dst_disk = driver.get_host_info("dst")["disk_free_gb"]
    driver.migrate_disk_and_power_off("src", inst, "dst", BIG, NET, BDI, False)
    assert driver.get_host_info("src")["memory_free_mb"] == src_free + inst["memory_mb"]
    assert driver.get_host_info("dst")["disk_free_gb"] == dst_disk - 40
    driver.finish_migration("dst", inst, BIG, NET, BDI, True)
    guest = driver.guests("dst")[0]
    assert (guest["memory_mb"], guest["vcpus"], guest["disk_gb"]) == (8192, 4, 40)
    assert guest["dirty_rate_mbps"] == 128           # the same guest, only resized
    names = [e["event"] for e in driver.timeline(inst["uuid"])]
    assert names == ["spawn", "migrate_disk_and_power_off", "finish_migration"]


def test_volume_backed_instance_may_get_a_smaller_local_disk(driver):
    instance = make_instance("vb-1", disk_gb=20, volume_backed=True)
    driver.spawn("src", instance, NET, BDI)
    driver.migrate_disk_and_power_off("src", instance, "dst", dict(BIG, disk_gb=0), NET,
                                      BDI, False)
    assert driver.get_guest("src", "vb-1")["state"] == "shutdown"


@pytest.mark.parametrize("when, committed", [("before", False), ("after", True)])
def test_kill_in_migrate_disk_and_a_rerun(state_file, driver, inst, when, committed):
    driver.inject_fault("migrate_disk_and_power_off", action="kill", when=when)
    child = run_child(state_file, f"""
        drv.migrate_disk_and_power_off("src", {inst!r}, "dst", {BIG!r}, {NET!r}, {BDI!r},
                                       False)
        print("survived")
    """)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "survived" not in child.stdout
    assert bool(driver.files("dst")) is committed
    state = {host: (driver.guests(host), driver.files(host), driver.vifs(host),
                    driver.volume_connections(host)) for host in ("src", "dst")}
    counters, timeline = driver.counters(), driver.timeline()
    result = driver.migrate_disk_and_power_off("src", inst, "dst", BIG, NET, BDI, False)
    assert result == {"disk_info": [{"path": DISK, "disk_gb": 40, "copied": True}]}
    assert driver.files("dst") == [{"location": "host:dst", "path": DISK,
                                    "instance": inst["uuid"], "disk_gb": 40}]
    assert driver.get_guest("src", inst["uuid"])["state"] == "shutdown"
    assert driver.vifs("src") == driver.volume_connections("src") == []
    if committed:       # the re-run after the crash found everything done
        assert driver.counters() == counters and driver.timeline() == timeline
        assert {host: (driver.guests(host), driver.files(host), driver.vifs(host),
                       driver.volume_connections(host))
                for host in ("src", "dst")} == state
    assert driver.side_effects(inst["uuid"])[("migrate_disk_and_power_off", "src")] == 1


# -- configuration -----------------------------------------------------------------------

def _conf(**overrides):
    conf = cfg.ConfigOpts()
    compute_conf.register_opts(conf)
    fake_driver_conf.register_opts(conf)
    conf(args=[])
    for name, (value, group) in overrides.items():
        conf.set_override(name, value, group)
    return conf


def test_from_conf_defaults_under_state_path(tmp_path):
    state = tmp_path / "state" / "nested"
    conf = _conf(state_path=(str(state), None))
    drv = FakeDriver.from_conf(conf)
    assert drv.state_file == str(state / "fake-hypervisor.sqlite")
    assert (state / "fake-hypervisor.sqlite").exists()
    assert FakeDriver.cache_key(conf) == (drv.state_file, 0.0)


def test_get_driver_builds_one_fake_driver_per_settings(tmp_path):
    conf = _conf(state_file=(str(tmp_path / "x.sqlite"), "fake_driver"),
                 time_scale=(0.5, "fake_driver"))
    reset_cache()
    try:
        drv = get_driver(conf)
        assert isinstance(drv, FakeDriver) and drv.time_scale == 0.5
        assert get_driver(conf) is drv
    finally:
        reset_cache()
