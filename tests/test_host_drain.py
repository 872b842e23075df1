"""Host drain: every instance moved off a disabled host, within the
concurrency limits, asserted in the database and on the fake hypervisors
(their timeline tells which copies overlapped)."""
import contextlib
import threading

import pytest

from helpers import snapshot, wait_until
from migrateflow import api, cloud, hostops
from migrateflow import exceptions as exc
from migrateflow.db import api as db_api
from migrateflow.tasks import live_migrate

#: simulated seconds of a 2 GiB copy over the fake's 1 GiB/s link, times
#: this scale: each copy takes about 60 ms of wall-clock time
TIME_SCALE = 0.03
_ENDS = ("migration.completed", "migration.failed", "migration.cancelled")


def _cloud(db, driver, sources, per_source, dests=("host-c", "host-d")):
    for name in (*sources, *dests):
        cloud.add_host(db, driver, name, shared_storage="nfs-1", memory_mb=1 << 20)
    return {src: [cloud.add_instance(db, driver, f"{src}-vm-{i}", src, volumes=1)
                  for i in range(per_source)] for src in sources}


def max_overlap(timeline, host=None):
    """Most copies running at once (from the source host, or anywhere)."""
    events = sorted((e["time"], e["event"] in _ENDS) for e in timeline
                    if (host is None or e["host"] == host)
                    and (e["event"] == "migration.started" or e["event"] in _ENDS))
    running = peak = 0
    for _time, ended in sorted(events, key=lambda e: (e[0], not e[1])):
        running += -1 if ended else 1
        peak = max(peak, running)
    return peak


def _assert_drained(db, driver, host, instances, report):
    uuids = {inst["uuid"] for inst in instances}
    assert report["host"] == host
    assert (report["total"], report["succeeded"], report["failed"]) == (len(uuids), len(uuids), 0)
    assert {r["instance"] for r in report["results"]} == uuids
    for result in report["results"]:
        assert (result["method"], result["status"], result["error"]) == (
            "live", "completed", None)
        assert db.get_migration(result["migration"])["status"] == "completed"
    assert [g["uuid"] for g in driver.guests(host)] == []
    assert db.list_instances(host=host) == []
    for inst in instances:
        got = db.get_instance(inst["uuid"])
        assert got["host"] != host
        assert (got["vm_state"], got["task_state"], got["power_state"]) == (
            "active", None, "running")
        assert [(g["uuid"], g["state"]) for g in driver.guests(got["host"])
                if g["uuid"] == inst["uuid"]] == [(inst["uuid"], "running")]
    row = db.get_host(host)
    assert row["disabled"] and row["disabled_reason"].startswith("draining")
    assert (row["memory_used_mb"], row["vcpus_used"]) == (0, 0)
    assert db.list_claims() == []
    assert driver.vifs(host) == [] and driver.volume_connections(host) == []


def test_drain_moves_every_instance_off_and_leaves_the_host_disabled(db, driver):
    instances = _cloud(db, driver, ["host-a"], 4)["host-a"]
    calls = []
    report = api.MigrationAPI().drain_host(
        "host-a", progress=lambda done, total, result: calls.append((done, total,
                                                                     result["instance"])))
    _assert_drained(db, driver, "host-a", instances, report)
    assert [(done, total) for done, total, _ in calls] == [(i, 4) for i in range(1, 5)]
    assert {uuid for _, _, uuid in calls} == {inst["uuid"] for inst in instances}
    # the scheduler never picked the disabled host, nor will it now
    assert all(db.get_migration(r["migration"])["dest_host"] in ("host-c", "host-d")
               for r in report["results"])


def test_drain_of_an_empty_host_only_disables_it(db, driver):
    _cloud(db, driver, ["host-a"], 0)
    report = hostops.drain_host(api.MigrationAPI(), "host-a")
    assert (report["total"], report["succeeded"], report["failed"], report["results"]) == (
        0, 0, 0, [])
    assert db.get_host("host-a")["disabled"]


@pytest.mark.parametrize("host, error", [
    ("host-z", exc.HostNotFound),
    ("host_a!", exc.InvalidHostName),
    ("-host-a", exc.InvalidHostName),
])
def test_drain_of_an_unknown_or_malformed_host_changes_nothing(host, error, db, driver):
    inst = _cloud(db, driver, ["host-a"], 1)["host-a"][0]
    hosts = ("host-a", "host-c", "host-d")
    before = snapshot(db, driver, inst["uuid"], hosts), db.list_hosts()
    with pytest.raises(error) as raised:
        hostops.drain_host(api.MigrationAPI(), host)
    assert repr(host) in str(raised.value)
    assert (snapshot(db, driver, inst["uuid"], hosts), db.list_hosts()) == before
    assert db.list_migrations() == []


@pytest.mark.parametrize("limit", [-1, "2", 1.5])
def test_drain_refuses_a_bad_limit_before_changing_anything(limit, db, driver):
    _cloud(db, driver, ["host-a"], 1)
    with pytest.raises(exc.InvalidRequest, match="per_host_limit"):
        hostops.drain_host(api.MigrationAPI(), "host-a", per_host_limit=limit)
    assert not db.get_host("host-a")["disabled"]
    assert db.list_migrations() == []


@pytest.mark.parametrize("processes", [1, 3])
def test_drain_runs_at_most_per_host_limit_copies_at_once(processes, conf, db, driver):
    # the flows' driver (built from the configuration) sleeps; this one reads
    conf.set_override("time_scale", TIME_SCALE, group="fake_driver")
    instances = _cloud(db, driver, ["host-a"], 8)["host-a"]
    report = hostops.drain_host(api.MigrationAPI(), "host-a", per_host_limit=2,
                                processes=processes)
    _assert_drained(db, driver, "host-a", instances, report)
    # without the gate four would overlap: the workers are twice the limit
    peak = max_overlap(driver.timeline(), "host-a")
    assert peak == 2


def test_configured_limit_applies_when_none_is_given(conf, db, driver):
    conf.set_override("time_scale", TIME_SCALE, group="fake_driver")
    conf.set_override("max_concurrent_live_migrations", 3)
    instances = _cloud(db, driver, ["host-a"], 9)["host-a"]
    report = hostops.drain_host(api.MigrationAPI(), "host-a")
    _assert_drained(db, driver, "host-a", instances, report)
    peak = max_overlap(driver.timeline(), "host-a")
    assert peak == 3


@pytest.mark.parametrize("processes", [1, 2])
def test_two_drains_at_once_honour_the_global_limit(processes, conf, db, driver):
    # copies of 600 ms: host-b's drain (4 rounds of 2) still copies when
    # host-a's first migration, started later, reaches its copy, even on a
    # loaded machine (at 120 ms the two drains once ran one after the other)
    conf.set_override("time_scale", 10 * TIME_SCALE, group="fake_driver")
    conf.set_override("max_concurrent_migrations_global", 3)
    clouds = _cloud(db, driver, ["host-a", "host-b"], 8)
    reports = {}

    def drain(host):  # host-b's drain runs its flows in worker processes
        reports[host] = hostops.drain_host(api.MigrationAPI(), host, per_host_limit=2,
                                           processes=processes if host == "host-b" else 1)

    threads = {host: threading.Thread(target=drain, args=(host,)) for host in clouds}
    threads["host-b"].start()
    # host-a's drain starts once host-b's copies run (worker processes take
    # a moment to start): their copies overlap
    wait_until(lambda: any(e["event"] == "migration.started" for e in driver.timeline()),
               what="the first copy from host-b")
    threads["host-a"].start()
    for thread in threads.values():
        thread.join(60)
    for host, instances in clouds.items():
        _assert_drained(db, driver, host, instances, reports[host])
        peak = max_overlap(driver.timeline(), host)
        assert peak <= 2
    # each drain alone would run 2 copies: together 4 without the global gate
    peak = max_overlap(driver.timeline())
    assert peak == 3
    assert hostops._gates == {}  # the drains' limits are gone with them


def test_a_stopped_instance_is_reported_and_left_in_place(db, driver):
    instances = _cloud(db, driver, ["host-a"], 3)["host-a"]
    stopped = instances[1]
    driver.power_off("host-a", db_api.instance_to_driver(stopped))
    db.update_instance(stopped["uuid"], vm_state="stopped", power_state="shutdown")
    before = snapshot(db, driver, stopped["uuid"], ("host-a",))
    report = hostops.drain_host(api.MigrationAPI(), "host-a")

    assert (report["total"], report["succeeded"], report["failed"]) == (3, 2, 1)
    result = report["results"][1]
    assert (result["instance"], result["method"], result["migration"], result["status"]) == (
        stopped["uuid"], None, None, "refused")
    assert "must be active and running" in result["error"]
    assert db.list_migrations(instance_uuid=stopped["uuid"]) == []
    assert [(g["uuid"], g["state"]) for g in driver.guests("host-a")] == [
        (stopped["uuid"], "shutdown")]
    after = snapshot(db, driver, stopped["uuid"], ("host-a",))
    for key in ("instance", "bindings", "volume_connections"):
        assert after[key] == before[key]
    for key in ("guests", "vifs", "hv_volumes"):  # what is left on host-a is its own
        assert after[key]["host-a"] == [e for e in before[key]["host-a"]
                                        if stopped["uuid"] in e]
    assert db.get_host("host-a")["disabled"]
    moved = [r for r in report["results"] if r["instance"] != stopped["uuid"]]
    assert [(r["method"], r["status"]) for r in moved] == [("live", "completed")] * 2


@contextlib.contextmanager
def waiting_at_the_gate(db, instance_uuid, dest):
    """(client, migration) of a live migration of the instance to ``dest``
    waiting at a copy gate whose only place another copy holds (the record
    names the step: it lasts); the place is given back on leaving."""
    gate = hostops.Gate([hostops._Limit(1)])
    assert gate.acquire(0)
    live_migrate.register_copy_gate(instance_uuid, gate)
    try:
        client = api.MigrationAPI()
        mig = client.live_migrate(instance_uuid, dest, wait=False)
        wait_until(lambda: db.get_migration(mig["uuid"])["current_step"] == "live-migration",
                   what="the migration to wait at the gate")
        yield client, mig
    finally:
        gate.release()
        live_migrate.unregister_copy_gate(instance_uuid)


def test_an_abort_while_waiting_at_the_gate_cancels_before_any_copy(db, driver):
    inst = _cloud(db, driver, ["host-a"], 1)["host-a"][0]
    before = snapshot(db, driver, inst["uuid"], ("host-a", "host-c", "host-d"))
    with waiting_at_the_gate(db, inst["uuid"], "host-c") as (client, mig):
        assert db.get_migration(mig["uuid"])["status"] == "preparing"
        client.abort(mig["uuid"])
        mig = client.wait(mig["uuid"], timeout=30)
    assert mig["status"] == "cancelled" and "waiting to start the copy" in mig["error"]
    assert not [e for e in driver.timeline(inst["uuid"]) if e["event"] == "migration.started"]
    assert snapshot(db, driver, inst["uuid"], ("host-a", "host-c", "host-d")) == before
