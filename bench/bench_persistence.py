"""Per-flow cost of TaskFlow persistence backends (prints figures only).

Runs a linear flow of 12 no-op tasks on the serial engine and prints the
median milliseconds per flow (load + run) for:

  a  no backend (Storage's private in-memory backend)
  b  TaskFlow's MemoryBackend
  c  TaskFlow's stock SQLAlchemy backend on a SQLite file (few flows: slow, leaks)
  d  migrateflow.persistence.SQLBackend on a SQLite file, synchronous=NORMAL
  e  the same with synchronous=FULL
  (pg / mysql: ours on the local servers, with --servers, when reachable)

then the ratios d/b and d/c, and the RSS of a fresh process after 200 and
1000 flows on (d).  Usage: python bench/bench_persistence.py [--servers]
"""
import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import sqlalchemy as sa
import taskflow.engines
from taskflow import task
from taskflow.patterns import linear_flow as lf
from taskflow.persistence.backends import impl_memory
from taskflow.persistence.backends import impl_sqlalchemy

from migrateflow import persistence

TASKS = 12


class Noop(task.Task):
    def execute(self):
        return None


def make_flow():
    return lf.Flow("bench").add(*[Noop("t%d" % i) for i in range(TASKS)])


def run_flows(backend, n):
    """Per-flow seconds for ``n`` flows."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        taskflow.engines.load(make_flow(), backend=backend).run()
        times.append(time.perf_counter() - start)
    return times


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_child(url):
    backend = persistence.SQLBackend.from_url(url, sqlite_synchronous="NORMAL")
    persistence.create_schema(backend.engine)
    run_flows(backend, 200)
    at_200 = rss_mb()
    run_flows(backend, 800)
    print("%.1f %.1f" % (at_200, rss_mb()))


@contextlib.contextmanager
def server_db(admin_url):
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as e:  # noqa: BLE001
        print("  (%s unreachable: %s)" % (admin_url, type(e).__name__))
        yield None
        return
    name = "mf_bench_" + uuid.uuid4().hex[:10]
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + name)
    try:
        yield sa.engine.make_url(admin_url).set(database=name)
    finally:
        drop = " WITH (FORCE)" if admin_url.startswith("postgresql") else ""
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE " + name + drop)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--stock-flows", type=int, default=30)
    parser.add_argument("--servers", action="store_true")
    parser.add_argument("--rss-child")
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)

    tmp = tempfile.mkdtemp(prefix="mf-bench-")
    stock = impl_sqlalchemy.SQLAlchemyBackend(
        {"connection": "sqlite:///%s/stock.db" % tmp})
    with contextlib.closing(stock.get_connection()) as conn:
        conn.upgrade()
    backends = {
        "a": None,
        "b": impl_memory.MemoryBackend(),
        "d": persistence.SQLBackend.from_url(
            "sqlite:///%s/normal.db" % tmp, sqlite_synchronous="NORMAL"),
        "e": persistence.SQLBackend.from_url(
            "sqlite:///%s/full.db" % tmp, sqlite_synchronous="FULL"),
    }
    for key in "de":
        persistence.create_schema(backends[key].engine)
    stack = contextlib.ExitStack()
    if args.servers:
        for key, admin in (
                ("pg", "postgresql+psycopg2://postgres@127.0.0.1/test"),
                ("mysql", "mysql+pymysql://root@127.0.0.1/test")):
            url = stack.enter_context(server_db(admin))
            if url is not None:
                backends[key] = persistence.SQLBackend.from_url(url)
                persistence.create_schema(backends[key].engine)
    samples = {key: [] for key in backends}
    for key, backend in backends.items():  # warm up
        run_flows(backend, 10)
    for _ in range(args.rounds):  # interleaved: machine noise hits all alike
        for key, backend in backends.items():
            samples[key] += run_flows(backend, args.per_round)
    samples["c"] = run_flows(stock, args.stock_flows)
    for key in list(backends) + ["c"]:
        if key not in ("a", "b", "c"):
            backends[key].close()
    stock.close()
    stack.close()

    med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    labels = {
        "a": "no backend", "b": "taskflow memory backend",
        "c": "taskflow stock SQL, SQLite file", "d": "ours, SQLite NORMAL",
        "e": "ours, SQLite FULL", "pg": "ours, PostgreSQL",
        "mysql": "ours, MariaDB"}
    print("\n%d no-op tasks per flow, serial engine, median of per-flow times"
          % TASKS)
    print("%-4s %-34s %7s %10s %8s" % ("", "variant", "flows", "ms/flow",
                                       "x mem(b)"))
    for key in ["a", "b", "c", "d", "e", "pg", "mysql"]:
        if key in med:
            print("%-4s %-34s %7d %10.2f %8.2f" % (
                key, labels[key], len(samples[key]), med[key],
                med[key] / med["b"]))
    print("\nd/b = %.2f   d/c = %.3f   (c/d = %.1fx faster)"
          % (med["d"] / med["b"], med["d"] / med["c"], med["c"] / med["d"]))
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child",
         "sqlite:///%s/rss.db" % tmp], capture_output=True, text=True,
        check=True).stdout.split()
    print("RSS of (d) in a fresh process: %s MB after 200 flows, %s MB after "
          "1000 flows" % (out[0], out[1]))


if __name__ == "__main__":
    main()
