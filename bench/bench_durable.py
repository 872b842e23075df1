"""Durable execution through the ZooKeeper jobboard, in one run (prints
its figures).

(1) Resume latency: conductor A runs a migration and is SIGKILLed in the
    middle of pre-live-migration (a fake-driver hang); conductor B is
    already waiting.  Latency = kill -> B applies the interrupted step (the
    fake hypervisor's timeline), per ZooKeeper session timeout; target
    <= session timeout + 1 s.
(2) Throughput: N migrations posted at once (fake driver, zero simulated
    delays) run by one and by two conductors; migrations per second.

Starts its own ZooKeeper (Debian's package; tests/servers.py) on loopback.

    python bench/bench_durable.py [--quick]
"""
import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import sqlalchemy as sa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import servers  # noqa: E402  (the tests' ZooKeeper manager)

from migrateflow import api, cloud, drivers, engine  # noqa: E402
from migrateflow.conf import CONF  # noqa: E402
from migrateflow.db import api as db_api  # noqa: E402


def write_config(workdir, zk_hosts, session_timeout, chroot, database_url=None):
    path = os.path.join(workdir, f"migrateflow-{chroot}.conf")
    database_url = database_url or f"sqlite:///{workdir}/state.sqlite"
    with open(path, "w") as out:
        out.write(f"""[DEFAULT]
state_path = {workdir}
[database]
connection = {database_url}
[fake_driver]
state_file = {workdir}/fake-hypervisor.sqlite
[migration]
live_migration_poll_interval = 0
post_migration_retry_interval = 0
[jobboard]
enabled = true
hosts = {zk_hosts}
path = /{chroot}
session_timeout = {session_timeout}
conductor_workers = 8
stuck_after = 3600
""")
    return path


def configure(config_path):
    engine.reset()
    drivers.reset_cache()
    CONF(["--config-file", config_path], project="migrateflow")


def start_conductor(config_path, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "migrateflow.cli", "--config-file",
                             config_path, "conductor"], stdout=log, stderr=subprocess.STDOUT)
    return proc


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def resume_latency(workdir, zk_hosts, session_timeout, index):
    config = write_config(workdir, zk_hosts, session_timeout, f"lat-{index}")
    configure(config)
    db, driver = db_api.get_db(), drivers.get_driver()
    inst = cloud.add_instance(db, driver, f"lat-{index}", "host-a")
    driver.inject_fault("pre_live_migration", action="hang", instance=inst["uuid"])
    a = start_conductor(config, os.path.join(workdir, f"a-{index}.log"))
    b = None
    try:
        mig = api.MigrationAPI().live_migrate(inst["uuid"], "host-b", wait=False)
        wait_for(lambda: db.get_migration(mig["uuid"])["current_step"] == "pre-live-migration",
                 60, "conductor A to reach pre-live-migration")
        b = start_conductor(config, os.path.join(workdir, f"b-{index}.log"))
        time.sleep(2.0)  # B connected and waiting, as a standby conductor is
        killed = time.time()
        a.send_signal(signal.SIGKILL)
        a.wait()
        driver.release_hangs()

        def resumed():
            return any(e["event"] == "pre_live_migration" for e in driver.timeline(inst["uuid"]))
        wait_for(resumed, 60, "conductor B to resume")
        first = next(e["time"] for e in driver.timeline(inst["uuid"])
                     if e["event"] == "pre_live_migration")
        done = api.MigrationAPI().wait(mig["uuid"], timeout=60)
        if done["status"] != "completed":
            sys.exit(f"resumed migration ended {done['status']}: {done['error']}")
        return first - killed
    finally:
        for proc in (a, b):
            if proc is not None:
                stop(proc)


def add_hosts(db, driver):
    for name in ("host-a", "host-b"):
        if db.find_host(name) is None:
            cloud.add_host(db, driver, name, shared_storage="nfs-1", memory_mb=1 << 22,
                           disk_gb=1 << 20, vcpus=1 << 12)


@contextlib.contextmanager
def postgresql_database():
    """A scratch database on the local PostgreSQL, or None if unreachable."""
    name = f"mf_bench_{os.getpid()}"
    admin = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",
                             isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except Exception as err:  # noqa: BLE001 - not reachable here
        print(f"  PostgreSQL not reachable ({type(err).__name__}): its rows are left out")
        yield None
        return
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        engine.reset()
        db_api.forget_db(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def throughput(workdir, zk_hosts, conductors, count, index, database_url=None):
    config = write_config(workdir, zk_hosts, 10.0, f"tp-{index}", database_url)
    configure(config)
    db, driver = db_api.get_db(), drivers.get_driver()
    add_hosts(db, driver)
    uuids = [cloud.add_instance(db, driver, f"tp-{index}-{i}", "host-a")["uuid"]
             for i in range(count)]
    procs = [start_conductor(config, os.path.join(workdir, f"tp-{index}-{n}.log"))
             for n in range(conductors)]
    try:
        time.sleep(2.0)  # conductors up and waiting
        client = api.MigrationAPI()
        started = time.perf_counter()
        migs = [client.live_migrate(u, "host-b", wait=False) for u in uuids]
        posting = time.perf_counter() - started
        results = [client.wait(m["uuid"], timeout=600) for m in migs]
        elapsed = time.perf_counter() - started
        print(f"    (posting {count} jobs took {posting:.2f} s of {elapsed:.2f} s)")
    finally:
        for proc in procs:
            stop(proc)
    bad = [m for m in results if m["status"] != "completed"]
    if bad:
        sys.exit(f"{len(bad)} migrations did not complete: {bad[0]['error']}")
    return count / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    args = parser.parse_args()
    repeats, count = (1, 10) if args.quick else (3, 60)
    servers.ensure_installed()
    with tempfile.TemporaryDirectory() as workdir:
        zk = servers.ZooKeeperServer(os.path.join(workdir, "zookeeper")).start()
        try:
            config = write_config(workdir, zk.hosts, 2.0, "setup")
            configure(config)
            add_hosts(db_api.get_db(), drivers.get_driver())
            print("resume latency: SIGKILL in pre-live-migration, standby conductor waiting")
            print(f"{'session timeout s':>18} {'runs':>5} {'latency s (each)':>26} "
                  f"{'max':>6} {'target':>7}")
            run = 0
            for timeout in (1.0, 2.0, 4.0):
                latencies = []
                for _ in range(repeats):
                    run += 1
                    latencies.append(resume_latency(workdir, zk.hosts, timeout, run))
                each = ", ".join(f"{x:.2f}" for x in latencies)
                print(f"{timeout:>18.1f} {repeats:>5} {each:>26} {max(latencies):>6.2f} "
                      f"{timeout + 1:>7.1f}", flush=True)
            print(f"\nthroughput: {count} migrations posted at once, fake driver, zero delays")
            index = 0
            with postgresql_database() as pg_url:
                for label, url in (("SQLite file", None), ("PostgreSQL", pg_url)):
                    if label == "PostgreSQL" and url is None:
                        continue
                    rates = {}
                    for n in (1, 2):
                        index += 1
                        rates[n] = throughput(workdir, zk.hosts, n, count, index, url)
                        print(f"  {label:<11} {n} conductor(s): {rates[n]:6.2f} migrations/s",
                              flush=True)
                    print(f"  {label:<11} 2 / 1 = {rates[2] / rates[1]:.2f}")
        finally:
            engine.reset()
            zk.stop()


if __name__ == "__main__":
    main()
