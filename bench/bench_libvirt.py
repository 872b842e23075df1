"""The libvirt driver on the real lab, in one run (prints its figures).

Starts the lab of tools/libvirt-lab/lab.sh (two libvirtd daemons, QEMU TCG
guests; needs root and the packages tools/test-all.sh installs), one
instances directory both hosts share, and then:

(1) one idle guest moved back and forth, alternating N times each: the
    engine's live migration (checks, preparation, copy, post steps) against
    raw ``virsh migrate --live --p2p`` with the same flags between the same
    daemons; wall time of each, the median ratio (target <= 1.10), and the
    downtime each reports (the migration record; ``virsh domjobinfo
    --completed`` on the destination);
(2) a guest dirtying 64 MiB without pause, copies capped at 10 MiB/s (plain
    pre-copy never converges): total time and downtime under our escalation
    against the reference default policy (downtime ramp, completion timeout,
    abort), the completion timeout scaled down so the run ends.

    python bench/bench_libvirt.py [-n 5] [--dirty-runs 2] [--timeout-per-gib 15]
"""
import argparse
import atexit
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

import libvirt

from migrateflow import api as mf_api
from migrateflow import cloud, drivers
from migrateflow.conf import CONF
from migrateflow.db import api as db_api
from migrateflow.tasks import convergence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_SCRIPT = os.path.join(ROOT, "tools", "libvirt-lab", "lab.sh")
HOSTS = ("lab-a", "lab-b")
MIGRATION_PORTS = {"lab-a": 24184, "lab-b": 24200}  # below the ephemeral range
FLAGS = ["VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_PERSIST_DEST",
         "VIR_MIGRATE_UNDEFINE_SOURCE", "VIR_MIGRATE_UNSAFE"]
VIRSH_FLAGS = ["--live", "--p2p", "--persistent", "--undefinesource", "--unsafe"]


def lab(*args, timeout=600):
    proc = subprocess.run(["bash", LAB_SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        sys.exit(f"lab.sh {args[0]} failed: {proc.stderr[-2000:]}")
    return proc.stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uri(ports, host):
    return f"qemu+tcp://127.0.0.1:{ports[host]}/system"


@contextlib.contextmanager
def running_lab(workdir, cache):
    """The two daemons, up while the block runs: every guest destroyed and
    each daemon stopped by its pid afterwards (before ``workdir`` goes: the
    pids are kept there)."""
    lab("guest", cache)
    ports, running = {}, []

    def stop():
        while running:
            subprocess.run(["bash", LAB_SCRIPT, "stop", workdir, running.pop()],
                           capture_output=True, timeout=120)
    atexit.register(stop)
    try:
        for host in HOSTS:
            ports[host] = free_port()
            lab("start", workdir, host, str(ports[host]), str(uuidlib.uuid4()),
                str(MIGRATION_PORTS[host]), cache)
            running.append(host)
        yield ports
    finally:
        stop()
        atexit.unregister(stop)


def configure(workdir, ports, cache):
    CONF([], project="migrateflow")
    shared = os.path.join(workdir, "shared-instances")
    for name, value, group in [
            ("state_path", workdir, None),
            ("connection", f"sqlite:///{workdir}/state.sqlite", "database"),
            ("compute_driver", "libvirt", None),
            ("connection_uris", {h: uri(ports, h) for h in HOSTS}, "libvirt"),
            ("migration_uri_template", "tcp://127.0.0.1", "libvirt"),
            ("migration_listen_address", "127.0.0.1", "libvirt"),
            ("instances_path", shared, "libvirt"),
            ("live_migration_flag", FLAGS, "libvirt"),
            ("virt_type", "qemu", "libvirt"),
            ("cpu_mode", "custom", "libvirt"),
            ("cpu_model", "qemu64", "libvirt"),
            ("guest_kernel", os.path.join(cache, "vmlinuz"), "libvirt"),
            ("guest_initrd", os.path.join(cache, "initrd.gz"), "libvirt"),
            ("guest_cmdline", "console=ttyS0 quiet panic=-1 mf_name={name}", "libvirt"),
            ("shutdown_timeout", 0, "libvirt")]:
        CONF.set_override(name, value, group=group)
    return shared


def add_hosts(db, driver):
    for name in HOSTS:
        cloud.record_host(db, driver, name, vcpus=64, shared_storage="lab-shared")


def boot(db, driver, shared, name):
    inst = cloud.add_instance(db, driver, name, "lab-a", memory_mb=256, vcpus=1, disk_gb=1,
                              flavor_name="lab.tiny")
    console = os.path.join(shared, inst["uuid"], "console.log")
    deadline = time.monotonic() + 120
    while not _ticked(console):
        if time.monotonic() > deadline:
            sys.exit(f"guest {name} did not boot")
        time.sleep(0.2)
    return inst["uuid"]


def _ticked(console):
    try:
        with open(console, errors="replace") as f:
            return "tick 2" in f.read()
    except FileNotFoundError:
        return False


def other(host):
    return HOSTS[1 - HOSTS.index(host)]


def engine_move(client, db, instance_uuid):
    dest = other(db.get_instance(instance_uuid)["host"])
    started = time.perf_counter()
    mig = client.live_migrate(instance_uuid, host=dest)
    wall = time.perf_counter() - started
    if mig["status"] != "completed":
        sys.exit(f"engine migration failed: {mig['error']}")
    return wall, mig["downtime_ms"]


def virsh_move(ports, db, instance_uuid):
    """virsh between the same daemons; the database is told afterwards (the
    next engine run starts from where the guest is)."""
    source = db.get_instance(instance_uuid)["host"]
    dest = other(source)
    cmd = ["virsh", "-q", "-c", uri(ports, source), "migrate", *VIRSH_FLAGS, instance_uuid,
           uri(ports, dest), "tcp://127.0.0.1", "--listen-address", "127.0.0.1"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"virsh migrate failed: {proc.stderr}")
    info = subprocess.run(["virsh", "-q", "-c", uri(ports, dest), "domjobinfo", "--completed",
                           instance_uuid], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"Total downtime:\s+(\d+)", info)
    db.update_instance(instance_uuid, host=dest)
    return wall, int(found.group(1)) if found else None


def idle_rounds(client, db, ports, instance_uuid, n):
    engine, raw = [], []
    print(f"(1) idle 256 MiB guest, shared instances directory, {n} runs each, alternating")
    print(f"{'run':>4} {'engine s':>9} {'engine downtime ms':>19} {'virsh s':>8} "
          f"{'virsh downtime ms':>18}")
    for i in range(n):
        engine.append(engine_move(client, db, instance_uuid))
        raw.append(virsh_move(ports, db, instance_uuid))
        print(f"{i + 1:>4} {engine[-1][0]:>9.2f} {engine[-1][1]!s:>19} {raw[-1][0]:>8.2f} "
              f"{raw[-1][1]!s:>18}")
    e_med = statistics.median(w for w, _ in engine)
    v_med = statistics.median(w for w, _ in raw)
    print(f"median wall: engine {e_med:.2f} s, virsh {v_med:.2f} s, ratio "
          f"{e_med / v_med:.2f} (target <= 1.10)")
    print(f"median downtime: engine {statistics.median(d or 0 for _, d in engine):.0f} ms, "
          f"virsh {statistics.median(d or 0 for _, d in raw):.0f} ms")


def dirty_run(client, db, instance_uuid, escalate):
    for name, value in [("live_migration_escalation", escalate),
                        ("live_migration_permit_post_copy", escalate)]:
        CONF.set_override(name, value, group="migration")
    dest = other(db.get_instance(instance_uuid)["host"])
    started = time.perf_counter()
    mig = client.live_migrate(instance_uuid, host=dest)
    wall = time.perf_counter() - started
    rungs = [part.split(" ")[0] for part in mig["scheduler_notes"].get(
        convergence.NOTE_KEY, "").split(convergence.SEPARATOR) if " applied " in part]
    return wall, mig, rungs


def dirty_rounds(client, db, instance_uuid, runs, per_gib):
    size_gib = 2.0           # Nova's sizing: at least 2 GiB
    print(f"\n(2) guest dirtying 64 MiB without pause, 10 MiB/s cap, completion timeout "
          f"{per_gib} s/GiB x {size_gib:.0f} GiB = {per_gib * size_gib:.0f} s, "
          f"escalation patience {CONF.migration.live_migration_escalation_iterations} "
          f"iteration(s), {runs} runs each, alternating")
    print(f"{'run':>4} {'policy':<12} {'status':<10} {'total s':>8} {'downtime ms':>12}  "
          "escalation steps applied")
    rows = {True: [], False: []}
    for i in range(runs):
        for escalate in (True, False):
            wall, mig, rungs = dirty_run(client, db, instance_uuid, escalate)
            rows[escalate].append((wall, mig))
            print(f"{i + 1:>4} {'escalation' if escalate else 'reference':<12} "
                  f"{mig['status']:<10} {wall:>8.1f} {mig['downtime_ms']!s:>12}  "
                  f"{', '.join(rungs) or '-'}")
    for escalate, label in ((True, "escalation"), (False, "reference")):
        walls = [w for w, _ in rows[escalate]]
        done = sum(m["status"] == "completed" for _, m in rows[escalate])
        print(f"{label}: median total {statistics.median(walls):.1f} s, "
              f"{done}/{len(walls)} completed")
    default = CONF.migration.live_migration_completion_timeout
    CONF.clear_override("live_migration_completion_timeout", group="migration")
    print(f"(with the default {CONF.migration.live_migration_completion_timeout} s/GiB the "
          f"reference policy copies for "
          f"{CONF.migration.live_migration_completion_timeout * size_gib:.0f} s before it "
          "aborts; escalation does not depend on the timeout)")
    CONF.set_override("live_migration_completion_timeout", default, group="migration")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="idle runs of each (>= 5)")
    parser.add_argument("--dirty-runs", type=int, default=2)
    parser.add_argument("--timeout-per-gib", type=int, default=15,
                        help="[migration] live_migration_completion_timeout for (2)")
    parser.add_argument("--patience", type=int, default=1,
                        help="[migration] live_migration_escalation_iterations for (2)")
    args = parser.parse_args()
    cache = os.environ.get("MIGRATEFLOW_LAB_CACHE") or os.path.expanduser(
        "~/.cache/migrateflow/libvirt-lab")
    with tempfile.TemporaryDirectory(prefix="bench-libvirt-") as workdir, \
            running_lab(workdir, cache) as ports:
        shared = configure(workdir, ports, cache)
        db, driver = db_api.get_db(), drivers.get_driver()
        client = mf_api.MigrationAPI()
        add_hosts(db, driver)
        print(f"libvirt {libvirt.getVersion()}, lab in {workdir}")
        idle = boot(db, driver, shared, "idle-bench")
        idle_rounds(client, db, ports, idle, args.n)
        driver.destroy(db.get_instance(idle)["host"],
                       db_api.instance_to_driver(db.get_instance(idle)))
        CONF.set_override("live_migration_bandwidth", 10, group="migration")
        CONF.set_override("live_migration_completion_timeout", args.timeout_per_gib,
                          group="migration")
        CONF.set_override("live_migration_escalation_iterations", args.patience,
                          group="migration")
        dirty = boot(db, driver, shared, "dirty-bench")
        dirty_rounds(client, db, dirty, args.dirty_runs, args.timeout_per_gib)


if __name__ == "__main__":
    main()
