"""Makespan of a host drain, in one run (prints its figures).

The fake driver simulates each live migration's copy: a 2 GiB idle guest
over the fake's 1 GiB/s link is 2 simulated seconds, slept at
``[fake_driver] time_scale`` = 0.1, so 200 ms of wall-clock time per copy
(measured first on one isolated migration: migration.started to
migration.completed on the fake's timeline).  The copy monitor polls with
no pause (``live_migration_poll_interval`` = 0): the fake's job sleeps its
simulated time inside each poll, so a pause would only add to the copy.

Rows: (a) 100 instances at concurrency 1, (b) 1,000 at 10, (c) 1,000 at 20
(``per_host_limit``); each drains one host of the embedded default (SQLite
state + SQLite flow persistence + fake driver, in a temporary directory) in
a fresh controller process, its flows in worker processes (``--processes``,
default two per CPU: one Python process cannot use more than one CPU), and
prints the makespan, the ideal ceil(N/K) x 200 ms, the ratio (target <=
1.10), the peak of copies at once (the fake's timeline), the CPU time per
migration (controller and workers), the controller's peak memory (VmHWM)
and the largest worker's.

    python bench/bench_drain.py [--quick] [--processes N]
    python bench/bench_drain.py --serial 200 [--split PROCESSES THREADS]

Each row is also run with copies of no time (``time_scale`` 0): its
makespan ("engine s") is the engine's own pace at that concurrency on this
machine, a floor under the row's makespan beside the ideal.

``--serial N`` measures the engine's own cost apart from the drain's
concurrency: N live migrations one after the other in this process with
no simulated copy time (``time_scale`` 0), CPU ms per migration and
migrations per second.  ``--split P T`` spreads them over P forked
processes of T threads each (each thread one after the other): what
threads sharing one interpreter, or more processes than CPUs, cost.
"""
import argparse
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from migrateflow import cloud, drivers, hostops
from migrateflow import api as mf_api
from migrateflow.conf import CONF
from migrateflow.db import api as db_api

COPY_S = 0.2
TIME_SCALE = 0.1           # x 2 simulated seconds = 200 ms per copy
MEMORY_MB = 2048           # over the fake's 1024 MiB/s link: 2 s simulated
DESTINATIONS = ("host-b", "host-c", "host-d", "host-e")
ROWS = {"full": [("a", 100, 1), ("b", 1000, 10), ("c", 1000, 20)],
        "quick": [("a", 10, 1), ("b", 100, 10), ("c", 100, 20)]}


def configure(workdir):
    CONF([], project="migrateflow")
    CONF.set_override("state_path", workdir)
    CONF.set_override("connection", f"sqlite:///{workdir}/state.sqlite", group="database")
    CONF.set_override("state_file", f"{workdir}/fake-hypervisor.sqlite", group="fake_driver")
    CONF.set_override("time_scale", TIME_SCALE, group="fake_driver")
    CONF.set_override("live_migration_poll_interval", 0.0, group="migration")


def build_cloud(instances):
    db, driver = db_api.get_db(), drivers.get_driver()
    for name in ("host-a", "host-z") + DESTINATIONS:
        cloud.add_host(db, driver, name, shared_storage="nfs-1", memory_mb=1 << 22,
                       disk_gb=1 << 20, vcpus=1 << 14)
    for i in range(instances):
        cloud.add_instance(db, driver, f"vm-{i}", "host-a", memory_mb=MEMORY_MB, volumes=1)
    return db, driver


def isolated_copy_s(db, driver):
    """One migration alone (from host-z): its copy on the fake's timeline."""
    inst = cloud.add_instance(db, driver, "vm-calibration", "host-z", memory_mb=MEMORY_MB)
    mig = mf_api.MigrationAPI().live_migrate(inst["uuid"], "host-b")
    assert mig["status"] == "completed", mig
    events = {e["event"]: e["time"] for e in driver.timeline(inst["uuid"])}
    return events["migration.completed"] - events["migration.started"]


def peak_rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(count, limit, processes, copy=True):
    """Drain ``count`` instances at ``limit``; a dict of figures (JSON).
    ``copy`` False: copies take no time (the engine's own pace)."""
    with tempfile.TemporaryDirectory() as workdir:
        configure(workdir)
        if not copy:
            CONF.set_override("time_scale", 0.0, group="fake_driver")
        db, driver = build_cloud(count)
        copy_s = isolated_copy_s(db, driver)
        client = mf_api.MigrationAPI()
        cpu, started = time.process_time(), time.perf_counter()
        report = hostops.drain_host(client, "host-a", per_host_limit=limit,
                                    processes=processes)
        makespan = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if report["succeeded"] != count:
            failed = [r for r in report["results"] if r["error"]]
            sys.exit(f"{len(failed)} migrations failed, first: {failed[0]}")
        peak, mean_copy = _copies(driver.timeline())
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += children.ru_utime + children.ru_stime
        return {"count": count, "limit": limit, "makespan": makespan, "copy_s": copy_s,
                "cpu_ms": cpu / count * 1000, "rss_mb": peak_rss_mb(),
                "workers_rss_mb": children.ru_maxrss / 1024,
                "peak_copies": peak, "mean_copy_s": mean_copy}


def serial(count, processes=1, threads=1):
    """``count`` live migrations with no copy time, split between
    ``processes`` forked processes of ``threads`` threads, each doing its
    share one after the other: (migrations per second, CPU ms each)."""
    with tempfile.TemporaryDirectory() as workdir:
        configure(workdir)
        CONF.set_override("time_scale", 0.0, group="fake_driver")
        db, driver = build_cloud(count + 1)
        client = mf_api.MigrationAPI()
        first, *rest = db.list_instances(host="host-a")
        client.live_migrate(first["uuid"])  # warm: imports, pools, the flow
        shares = [rest[i::processes * threads] for i in range(processes * threads)]
        fork = multiprocessing.get_context("fork")
        cpu, children = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        workers = [fork.Process(target=_migrate_in_threads, args=(shares[i::processes],))
                   for i in range(processes)] if processes > 1 else []
        for worker in workers:
            worker.start()
        if not workers:
            _migrate_in_threads(shares)
        for worker in workers:
            worker.join()
            if worker.exitcode:
                sys.exit(f"a worker failed (exit code {worker.exitcode})")
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu + (after.ru_utime + after.ru_stime) - (
            children.ru_utime + children.ru_stime)
        return count / wall, cpu / count * 1000


def _migrate_in_threads(shares):
    def migrate(share):
        api = mf_api.MigrationAPI()
        for inst in share:
            mig = api.live_migrate(inst["uuid"])
            if mig["status"] != "completed":
                failed.append(mig["error"])

    failed = []
    threads = [threading.Thread(target=migrate, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        sys.exit(f"{len(failed)} migrations failed, first: {failed[0]}")


def _copies(timeline):
    """(most copies at once, mean copy in seconds) on the fake's timeline."""
    running = peak = 0
    started, spans = {}, []
    for event in timeline:
        if event["event"] == "migration.started":
            running += 1
            peak = max(peak, running)
            started[event["instance"]] = event["time"]
        elif event["event"] in ("migration.completed", "migration.failed",
                                "migration.cancelled"):
            running -= 1
            spans.append(event["time"] - started.pop(event["instance"]))
    return peak, sum(spans) / len(spans)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    parser.add_argument("--processes", type=int, default=2 * os.cpu_count(),
                        help="worker processes of the drain (1: threads of the "
                             "controller; default: two per CPU)")
    parser.add_argument("--row", nargs=2, type=int, metavar=("COUNT", "LIMIT"),
                        help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--no-copy", action="store_true",
                        help=argparse.SUPPRESS)  # that row with copies of no time
    parser.add_argument("--serial", type=int, metavar="N",
                        help="only the CPU per migration of N serial migrations")
    parser.add_argument("--split", nargs=2, type=int, metavar=("PROCESSES", "THREADS"),
                        help="with --serial: split them between PROCESSES forked "
                             "processes of THREADS threads each")
    args = parser.parse_args()
    if args.serial:
        processes, threads = args.split or (1, 1)
        rate, cpu_ms = serial(args.serial, processes, threads)
        print(f"serial: {cpu_ms:.1f} CPU ms per migration, {rate:.1f} migrations/s "
              f"({args.serial} live migrations, no copy time, one after the other in "
              f"each of {processes} process(es) x {threads} thread(s))")
        return
    if args.row:
        print(json.dumps(run_row(*args.row, args.processes, copy=not args.no_copy)))
        return
    rows = ROWS["quick" if args.quick else "full"]
    print(f"drain of one host; fake copy {COPY_S * 1000:.0f} ms (time_scale {TIME_SCALE}, "
          f"{MEMORY_MB} MiB guest); embedded default; {os.cpu_count()} CPUs; up to "
          f"{args.processes} worker processes", flush=True)
    figures = []
    for name, count, limit in rows:
        fig = _row(count, limit, args.processes)
        fig["name"] = name
        fig["engine_s"] = _row(count, limit, args.processes, "--no-copy")["makespan"]
        figures.append(fig)
        print(f"  ... ({name}) {count} at {limit}: {fig['makespan']:.2f} s "
              f"(copies of no time: {fig['engine_s']:.2f} s)", flush=True)
    print(f"\nisolated copy (fake timeline, first row): {figures[0]['copy_s'] * 1000:.1f} ms")
    print(f"\n{'row':<5}{'N':>6}{'K':>4}{'makespan s':>12}{'ideal s':>9}{'ratio':>7}"
          f"{'engine s':>10}{'copies at once':>16}{'mean copy ms':>14}{'CPU ms/mig':>12}"
          f"{'ctl RSS MB':>12}{'worker RSS MB':>15}")
    for fig in figures:
        ideal = math.ceil(fig["count"] / fig["limit"]) * COPY_S
        ratio = fig["makespan"] / ideal
        print(f"({fig['name']}){fig['count']:>7}{fig['limit']:>4}{fig['makespan']:>12.2f}"
              f"{ideal:>9.2f}{ratio:>7.2f}{fig['engine_s']:>10.2f}{fig['peak_copies']:>16}"
              f"{fig['mean_copy_s'] * 1000:>14.0f}{fig['cpu_ms']:>12.1f}"
              f"{fig['rss_mb']:>12.1f}{fig['workers_rss_mb']:>15.1f}"
              f"  {'ok' if ratio <= 1.10 else 'over'}")
    print("\ntarget: ratio <= 1.10 in every row.  engine s: the same drain with copies "
          "of no time,\nthe engine's own pace on this machine (a row cannot end "
          "sooner than that nor than its ideal)")


def _row(count, limit, processes, *flags):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--row", str(count),
                          str(limit), "--processes", str(processes), *flags],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
