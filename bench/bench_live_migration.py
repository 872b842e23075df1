"""What durability costs a live migration, in one run (prints its figures).

(1) a bare TaskFlow flow with as many no-op atoms as the live-migration
    flow, serial engine, memory backend;
(2) the same flow on TaskFlow's stock SQL backend on a SQLite file;
(3) our live migration end to end (fake driver, zero simulated delays) with
    our durable SQLite persistence and state database;
then the medians per flow, the ratios (3)/(2) and (3)/(1), and the process
RSS after 200 and after 2,000 migrations of (3).

Targets (issue 2): (3)/(2) <= 1.0, (3)/(1) <= 5, RSS(2000) <= 1.2 x RSS(200).

    python bench/bench_live_migration.py [--quick]
"""
import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time

import taskflow.engines
from taskflow import task
from taskflow.patterns import linear_flow
from taskflow.persistence import backends as tf_backends

from migrateflow import api, cloud, drivers, engine, graph
from migrateflow.conf import CONF
from migrateflow.db import api as db_api
from migrateflow.flows import live_migration


class NoOp(task.Task):
    def execute(self):
        return None


def atom_count():
    """Tasks and retry controllers of the flow, nested subflows included."""
    return len(graph.execution_order(graph.describe(live_migration.build())))


def noop_flow(n):
    flow = linear_flow.Flow("noop")
    flow.add(*[NoOp(name=f"noop-{i}") for i in range(n)])
    return flow


def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def time_noop(n_atoms, count, backend=None):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        taskflow.engines.run(noop_flow(n_atoms), engine="serial", backend=backend)
        times.append(time.perf_counter() - started)
    return times


def stock_sql_backend(workdir):
    backend = tf_backends.fetch({"connection": f"sqlite:///{workdir}/stock.sqlite"})
    with contextlib.closing(backend.get_connection()) as conn:
        conn.upgrade()
    return backend


def configure(workdir):
    CONF([], project="migrateflow")
    CONF.set_override("connection", f"sqlite:///{workdir}/state.sqlite", group="database")
    CONF.set_override("state_file", f"{workdir}/fake-hypervisor.sqlite", group="fake_driver")
    CONF.set_override("live_migration_poll_interval", 0.0, group="migration")


def build_cloud(instances):
    db, driver = db_api.get_db(), drivers.get_driver()
    for name in ("host-a", "host-b"):
        cloud.add_host(db, driver, name, shared_storage="nfs-1", memory_mb=1 << 20)
    return [cloud.add_instance(db, driver, f"vm-{i}", "host-a", ports=1, volumes=1)["uuid"]
            for i in range(instances)]


def migrate_many(client, uuids, count, checkpoints, rss):
    """Ping-pong migrations between the two hosts; times each one."""
    db = db_api.get_db()
    times = []
    for i in range(count):
        uuid = uuids[i % len(uuids)]
        dest = "host-b" if db.get_instance(uuid)["host"] == "host-a" else "host-a"
        started = time.perf_counter()
        mig = client.live_migrate(uuid, dest)
        times.append(time.perf_counter() - started)
        if mig["status"] != "completed":
            sys.exit(f"migration {i} ended {mig['status']}: {mig['error']}")
        if (i + 1) % 100 == 0:
            print(f"  ... {i + 1}: median of last 100 {statistics.median(times[-100:]) * 1000:.1f} ms", flush=True)
        if i + 1 in checkpoints:
            gc.collect()
            rss[i + 1] = rss_mb()
            print(f"  ... {i + 1} migrations, RSS {rss[i + 1]:.1f} MB", flush=True)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    args = parser.parse_args()
    n_noop, n_stock, n_ours, first = (30, 10, 40, 20) if args.quick else (300, 60, 2000, 200)
    atoms = atom_count()
    print(f"live-migration flow: {atoms} atoms; serial engine; one process")
    with tempfile.TemporaryDirectory() as workdir:
        t1 = time_noop(atoms, n_noop)
        # (3) before (2): the stock backend's leak must not inflate our RSS
        configure(workdir)
        uuids = build_cloud(10)
        rss = {}
        t3 = migrate_many(api.MigrationAPI(), uuids, n_ours, {first, n_ours}, rss)
        engine.reset()
        t2 = time_noop(atoms, n_stock, backend=stock_sql_backend(workdir))
    m1, m2, m3 = (statistics.median(t) * 1000 for t in (t1, t2, t3))
    p90 = statistics.quantiles(t3, n=10)[-1] * 1000
    rows = [("(1) no-op flow, memory backend", n_noop, m1),
            ("(2) no-op flow, stock SQL backend, SQLite file", n_stock, m2),
            ("(3) live migration, fake driver, durable SQLite", n_ours, m3)]
    print(f"\n{'case':<50} {'flows':>6} {'median ms':>10}")
    for name, count, median in rows:
        print(f"{name:<50} {count:>6} {median:>10.2f}")
    print(f"\n(3) p90 {p90:.2f} ms")
    print(f"(3)/(2) = {m3 / m2:.2f}   target <= 1.0")
    print(f"(3)/(1) = {m3 / m1:.2f}   target <= 5")
    print(f"RSS after {first}: {rss[first]:.1f} MB; after {n_ours}: {rss[n_ours]:.1f} MB; "
          f"ratio {rss[n_ours] / rss[first]:.2f}   target <= 1.2")


if __name__ == "__main__":
    main()
