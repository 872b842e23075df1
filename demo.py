"""The demo: a small fake cloud and four live migrations, told in plain lines.

It shows what the engine promises, on real SQLite files and real TaskFlow
engines: a move to a named host, a move where the scheduler chooses (and
skips a host with an older hypervisor), a move that fails on the
destination and rolls back leaving the instance untouched on its source,
and a request refused before anything changes.  Everything lives in
``<state_dir>/demo/`` (wiped at each run, so the demo never touches a real
state database), which the ``migrateflow`` commands can explore afterwards.
"""
import os
import shutil
import time

from migrateflow import api as api_mod
from migrateflow import cli, cloud, drivers, engine, scheduler
from migrateflow import exceptions as exc
from migrateflow.db import api as db_api
from migrateflow.states import LIVE_TERMINAL
from migrateflow.states import LiveMigrationStatus as Status

SOURCE_OF_A, DEST_OF_A = "compute-1", "compute-2"
HOSTS = [  # name, facts: compute-4 is the biggest but runs an older hypervisor
    ("compute-1", {"shared_storage": "nfs-1"}),
    ("compute-2", {"shared_storage": "nfs-1"}),
    ("compute-3", {"memory_mb": 131072}),
    ("compute-4", {"memory_mb": 262144, "hypervisor_version": 6002000}),
]
INSTANCES = [  # name, host, options
    ("web-1", "compute-1", {"memory_mb": 4096, "ports": 2, "volumes": 1,
                            "dirty_rate_mbps": 150.0}),
    ("db-1", "compute-1", {"memory_mb": 8192, "ports": 1, "volumes": 2,
                           "volume_backed": True}),
    ("app-1", "compute-2", {"memory_mb": 2048, "ports": 2, "volumes": 1}),
]


def _fresh(demo_dir):
    """Forget cached handles on the previous run's files, then delete them."""
    db_api.forget_db(f"sqlite:///{demo_dir}/state.sqlite")
    engine.reset()
    drivers.reset_cache()
    shutil.rmtree(demo_dir, ignore_errors=True)
    os.makedirs(demo_dir)


def _settings(demo_dir, time_scale=0.0):
    return {("state_path", None): demo_dir,
            ("connection", "database"): f"sqlite:///{demo_dir}/state.sqlite",
            ("connection", "persistence"): None,
            ("state_file", "fake_driver"): os.path.join(demo_dir, "fake-hypervisor.sqlite"),
            ("time_scale", "fake_driver"): time_scale,
            ("live_migration_poll_interval", "migration"): 0.02,
            ("post_migration_retry_interval", "migration"): 0.0}


class Demo:
    def __init__(self, demo_dir, out):
        self.dir, self.out = demo_dir, out
        self.api = api_mod.MigrationAPI()
        self.db, self.ids, self.surprises = db_api.get_db(), {}, []

    @property
    def driver(self):  # looked up each time: time_scale changes the driver
        return drivers.get_driver()

    def expect(self, ok, what):
        if not ok:
            self.surprises.append(what)
            self.out(f"   UNEXPECTED: {what}")

    def build(self):
        self.out(f"Building a fake cloud in {self.dir}")
        for name, facts in HOSTS:
            cloud.add_host(self.db, self.driver, name, **facts)
        for name, host, options in INSTANCES:
            self.ids[name] = cloud.add_instance(self.db, self.driver, name, host,
                                                **options)["uuid"]
        self.summary()

    def summary(self):
        for h in self.db.list_hosts():
            guests = ", ".join(i["name"] for i in self.db.list_instances(host=h["name"]))
            version = scheduler.version_str(h["hypervisor_version"])
            self.out(f"   {h['name']:<10} {h['hypervisor_type']} {version:<6} "
                     f"storage={h['shared_storage'] or 'local':<6} memory "
                     f"{h['memory_used_mb']:>6}/{h['memory_mb']:<6} MiB  guests: {guests or '-'}")

    def placement(self, name):
        """Where the state DB and the hypervisors say the instance lives."""
        uuid = self.ids[name]
        inst = self.db.get_instance(uuid)
        bindings = [f"{b['host']} {b['status']}"
                    for b in self.db.list_port_bindings(instance_uuid=uuid)]
        ports = [f"{bindings.count(b)}x {b}" for b in sorted(set(bindings))]
        vols = sorted({c["host"] for c in self.db.list_volume_connections(instance_uuid=uuid)})
        running = [h["name"] for h in self.db.list_hosts()
                   if any(g["uuid"] == uuid for g in self.driver.guests(h["name"]))]
        self.out(f"   {name}: host={inst['host']} {inst['vm_state']}/{inst['power_state']} "
                 f"task_state={inst['task_state']}; hypervisor runs it on {', '.join(running)}; "
                 f"port bindings: {', '.join(ports)}; volumes connected on: {', '.join(vols)}")
        return inst

    def migrate(self, name, host=None, watch=False):
        mig = self.api.live_migrate(self.ids[name], host=host, wait=not watch)
        if watch:
            last = None
            while mig["status"] not in LIVE_TERMINAL:
                time.sleep(0.02)
                mig = self.api.show_migration(mig["uuid"])
                seen = (mig["status"], mig["iteration"])
                if seen != last:  # one line per status or copy iteration
                    last = seen
                    self.out(f"   progress: {cli.progress_line(mig)}")
            mig = self.api.wait(mig["uuid"])
        self.out(f"   migration {mig['uuid'][:8]}: {mig['status']} "
                 f"{mig['source_host']} -> {mig['dest_host']}"
                 + (f" ({mig['iteration']} iterations, downtime {mig['downtime_ms'] or 0:.1f} ms)"
                    if mig["status"] == Status.COMPLETED else ""))
        return mig

    def scenario_a(self):
        self.out(f"\n(a) Live-migrate web-1 from {SOURCE_OF_A} to {DEST_OF_A} "
                 "(shared storage nfs-1; a busy guest, progress slowed down to be seen)")
        with cli.config_overrides(_settings(self.dir, time_scale=0.02)):
            mig = self.migrate("web-1", DEST_OF_A, watch=True)
        inst = self.placement("web-1")
        self.expect(mig["status"] == Status.COMPLETED and inst["host"] == DEST_OF_A,
                    "web-1 should have moved to compute-2")

    def scenario_b(self):
        self.out("\n(b) Live-migrate db-1 (volume-backed) with no host: the scheduler chooses")
        inst, source = self.db.get_instance(self.ids["db-1"]), self.db.get_host("compute-1")
        for dest in self.db.list_hosts():
            if dest["name"] != source["name"]:
                try:
                    scheduler.check_destination(inst, source, dest)
                except exc.MigrateflowError as err:
                    self.out(f"   scheduler skips {dest['name']}: {err.message}")
        mig = self.migrate("db-1")
        self.out(f"   the scheduler chose {mig['dest_host']} (the most free memory)")
        self.placement("db-1")
        self.expect(mig["status"] == Status.COMPLETED and mig["dest_host"] != "compute-4",
                    "db-1 should have moved, not to compute-4")

    def scenario_c(self):
        self.out("\n(c) Live-migrate app-1 to compute-3 while its hypervisor fails "
                 "pre_live_migration (after plugging VIFs and connecting volumes)")
        self.driver.inject_fault("pre_live_migration", host="compute-3", when="after",
                                 message="pre_live_migration failed on compute-3 (injected)")
        mig = self.migrate("app-1", "compute-3")
        self.driver.clear_faults()
        self.out(f"   status: {mig['status']}")
        self.out(f"   reason: {mig['error']}")
        reverted = [s["name"] for s in self.api.flow_steps(mig["uuid"])
                    if s["state"] == "REVERTED"][::-1]
        self.out("   rollback, steps reverted in order: " + (" -> ".join(reverted) or "none"))
        inst = self.placement("app-1")
        left = (self.driver.guests("compute-3"), self.driver.vifs("compute-3"),
                self.driver.volume_connections("compute-3"),
                self.db.list_claims(host="compute-3", migration_uuid=mig["uuid"]))
        leftovers = [x for group in left for x in group
                     if x.get("instance", x.get("uuid", x.get("instance_uuid"))) == inst["uuid"]]
        self.out(f"   on compute-3: {len(leftovers)} leftovers of app-1 "
                 "(guest, VIFs, volume connections, resource claims)")
        self.expect(mig["status"] == Status.FAILED, "the migration should be 'failed'")
        self.expect(inst["host"] == "compute-2" and inst["vm_state"] == "active"
                    and inst["task_state"] is None and not leftovers,
                    "app-1 should be active, untouched on compute-2")

    def scenario_d(self):
        self.out("\n(d) Requests refused before anything changes")
        before = len(self.api.list_migrations())
        for name, host in (("web-1", DEST_OF_A), ("app-1", "compute-4")):
            try:
                self.api.live_migrate(self.ids[name], host=host)
                self.expect(False, f"moving {name} to {host} should be refused")
            except exc.MigrateflowError as err:
                self.out(f"   {name} -> {host}: refused: {err.message}")
        self.expect(len(self.api.list_migrations()) == before, "no migration recorded")


def run_demo(state_dir, out=print):
    """Run the demo in ``<state_dir>/demo``; returns 0 when every scenario
    behaved as described, 1 otherwise (each surprise is printed)."""
    demo_dir = os.path.join(os.path.abspath(state_dir), "demo")
    _fresh(demo_dir)
    with cli.config_overrides(_settings(demo_dir)):
        demo = Demo(demo_dir, out)
        demo.build()
        for scenario in (demo.scenario_a, demo.scenario_b, demo.scenario_c, demo.scenario_d):
            scenario()
        out("\nHosts now:")
        demo.summary()
    out(f"\nExplore: migrateflow --state-dir {demo_dir} migration-list "
        "(or host-list, instance-list, migration-show ID)")
    return 1 if demo.surprises else 0
