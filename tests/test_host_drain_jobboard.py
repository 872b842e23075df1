"""Host drain with ``[jobboard] enabled``: the live migrations are posted
as jobs and run by two real conductor processes (forked from the crash
tests' zygote, on a real ZooKeeper); the drain holds the per-host gate for
each whole migration, so the fake hypervisors' timeline never shows more
copies at once than the limit, and every instance ends on another host."""
import os

import pytest

from crash_harness import Env
from migrateflow import api, cloud, engine
from migrateflow.conf import CONF

from test_host_drain import _assert_drained, max_overlap

TIME_SCALE = 0.03  # about 60 ms a copy


@pytest.fixture
def board(zk_conf, zk_hosts, db, driver, zygote, tmp_path):
    CONF.set_override("time_scale", TIME_SCALE, group="fake_driver")
    CONF.set_override("enabled", True, group="jobboard")
    for name in ("host-a", "host-c", "host-d"):
        cloud.add_host(db, driver, name, shared_storage="nfs-1", memory_mb=1 << 20)
    instances = [cloud.add_instance(db, driver, f"vm-{i}", "host-a", volumes=1)
                 for i in range(6)]
    env = Env(tmp_path, zk_hosts, db, driver, zygote, instances[0])
    env.instances = instances
    yield env
    env.stop_all()
    engine.reset()
    CONF.clear_override("enabled", group="jobboard")
    CONF.clear_override("time_scale", group="fake_driver")


@pytest.mark.parametrize("limit", [1, 2])
def test_drain_through_conductors_keeps_the_limit(limit, board, db, driver):
    board.start("C1")
    board.start("C2")
    report = api.MigrationAPI().drain_host("host-a", per_host_limit=limit)
    _assert_drained(db, driver, "host-a", board.instances, report)
    assert max_overlap(driver.timeline(), "host-a") == limit
    owners = {db.get_migration(r["migration"])["owner"] for r in report["results"]}
    assert owners and all(not o.endswith(f":{os.getpid()}") for o in owners), owners
