"""Crash matrix of the resize, confirm-resize and revert-resize flows
("Durable execution", as tests/test_crash_matrix.py does for live
migration).

Each case resizes the small cloud's instance (flavor m2 → m4) from host-a
to host-c (local storage: the disk is really copied) through the jobboard:
conductor A (a real process, tests/crash_conductor.py) claims the job and
is SIGKILLed at a chosen point, conductor B takes the job over once A's
ZooKeeper session expired and finishes it.  The confirm and revert cases
first resize in this process, then post the confirm (revert) job.

Scenarios and their end state:

* ``resize``: ``finished``; instance RESIZED on host-c with m4, its guest
  running there, the source's guest kept stopped with m2; host-a holds m2,
  host-c m4; ports, volumes and VIFs on host-c only;
* ``resize-rollback``: finish_migration fails after defining the guest;
  the rollback restores the source: ``error``, instance active on host-a
  with m2, nothing left on host-c, no claim, no quota reservation;
* ``confirm``: ``confirmed``; nothing left on host-a;
* ``revert``: ``reverted``; instance active on host-a with m2, nothing
  left on host-c.

Kill points: every atom of the flow × {RUNNING, SUCCESS} and the flow's
SUCCESS; right after each hypervisor call's side effect (the step is still
RUNNING); inside a hung hypervisor call; and, for the rollback, at every
REVERTING / REVERTED.  Every case checks the end state in the database and
the fake driver, that each hypervisor side effect happened exactly once,
and from both conductors' journal that no finished step ran again.
"""
import pytest
from futurist import _thread as futurist_thread
from taskflow import states as st

from crash_harness import WORKER_IDLE, Case, Env, arm, assert_no_step_twice, persisted_state
from crash_harness import run_case, usage
from migrateflow import cloud, engine, graph
from migrateflow.conf import CONF
from migrateflow.flows import confirm_resize, resize, revert_resize

pytestmark = pytest.mark.slow

SOURCE, DEST = "host-a", "host-c"
HOSTS = ("host-a", "host-b", "host-c")
STORAGE = {"host-a": "nfs-1", "host-b": "nfs-1", "host-c": "host-c"}
DISK = "/var/lib/migrateflow/instances/{uuid}"
M2 = (2048, 2, 20)
M4 = (4096, 4, 40)

FLOWS = {"resize": resize, "resize-rollback": resize, "confirm": confirm_resize,
         "revert": revert_resize}
ATOMS = {name: graph.execution_order(graph.describe(module.build()))
         for name, module in FLOWS.items()}
#: what the rollback reverts: every atom up to the failing finish-migration
ROLLBACK_ATOMS = ATOMS["resize"][:ATOMS["resize"].index("finish-migration") + 1]
TRIGGER = ("finish_migration", "raise", "after", DEST, 1)

_RESIZED = {("spawn", SOURCE): 1, ("migrate_disk_and_power_off", SOURCE): 1,
            ("finish_migration", DEST): 1}
SIDE_EFFECTS = {
    "resize": _RESIZED,
    "resize-rollback": {**_RESIZED, ("finish_revert_migration", DEST): 1},
    "confirm": {**_RESIZED, ("confirm_migration", SOURCE): 1},
    "revert": {**_RESIZED, ("finish_revert_migration", DEST): 1},
}
#: hypervisor calls of each flow → host (crash right after, or hang inside)
DRIVER_CALLS = {
    "resize": {"get_guest": ("check-instance-for-resize", SOURCE),
               "check_instance_shared_storage": ("check-shared-storage", SOURCE),
               "migrate_disk_and_power_off": ("migrate-disk-and-power-off", SOURCE),
               "finish_migration": ("finish-migration", DEST)},
    "confirm": {"confirm_migration": ("confirm-migration-at-source", SOURCE)},
    "revert": {"finish_revert_migration": ("finish-revert-migration", DEST)},
}
FINAL = {"resize": ("finished", st.SUCCESS), "resize-rollback": ("error", st.REVERTED),
         "confirm": ("confirmed", st.SUCCESS), "revert": ("reverted", st.SUCCESS)}


def _cases():
    cases = []
    for scenario in ("resize", "confirm", "revert"):
        for atom in ATOMS[scenario]:
            for state in (st.RUNNING, st.SUCCESS):
                cases.append(Case(f"{scenario}-kill-at-{atom}-{state}", scenario,
                                  kill_at=f"{atom}:{state}"))
        cases.append(Case(f"{scenario}-kill-at-flow-SUCCESS", scenario, kill_at="flow:SUCCESS"))
        for method, (step, host) in DRIVER_CALLS[scenario].items():
            cases.append(Case(f"{scenario}-driver-kill-after-{method}", scenario,
                              faults=((method, "kill", "after", host, 1),),
                              interrupted=f"{step}:RUNNING"))
            cases.append(Case(f"{scenario}-hang-{method}", scenario,
                              faults=((method, "hang", "before", host, 1),), hang=method,
                              interrupted=f"{step}:RUNNING"))
    points = ["finish-migration:FAILURE"]
    for atom in reversed(ROLLBACK_ATOMS):
        points += [f"{atom}:{st.REVERTING}", f"{atom}:{st.REVERTED}"]
    points.append(f"flow:{st.REVERTED}")
    for point in points:
        cases.append(Case("resize-rollback-kill-at-" + point.replace(":", "-"),
                          "resize-rollback", kill_at=point, faults=(TRIGGER,)))
    cases.append(Case("resize-rollback-driver-kill-after-finish_revert_migration",
                      "resize-rollback",
                      faults=(TRIGGER, ("finish_revert_migration", "kill", "after", DEST, 1)),
                      interrupted="finish-migration:REVERTING"))
    return cases


CASES = _cases()


@pytest.fixture
def env(zk_conf, zk_hosts, db, driver, zygote, tmp_path, monkeypatch):
    for host in HOSTS:
        cloud.add_host(db, driver, host,
                       shared_storage=None if STORAGE[host] == host else STORAGE[host])
    db.create_flavor("m2", memory_mb=2048, vcpus=2, disk_gb=20)
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    inst = cloud.add_instance(db, driver, "vm-1", SOURCE, ports=2, volumes=1,
                              flavor_name="m2")
    monkeypatch.setattr(futurist_thread.ThreadWorker, "MAX_IDLE_FOR", WORKER_IDLE)
    world = Env(tmp_path, zk_hosts, db, driver, zygote, inst)
    yield world
    world.stop_all()
    engine.reset()
    CONF.clear_override("enabled", group="jobboard")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crash(case, env):
    final = run_case(env, case, lambda fault_ids: _post(case, env, fault_ids),
                     FINAL[case.scenario][0])
    try:
        assert persisted_state(final["flow_uuid"], "flow") == FINAL[case.scenario][1]
        assert_end_state(env, final, case.scenario)
        if case.scenario == "resize-rollback":
            assert_no_step_twice(env, set(ROLLBACK_ATOMS) - {"finish-migration"},
                                 ROLLBACK_ATOMS)
        else:
            assert_no_step_twice(env, ATOMS[case.scenario], ())
    except AssertionError as err:
        raise AssertionError(f"{err}\n{env.logs()}") from None


def _post(case, env, fault_ids):
    """Arm the faults and post the case's job (confirm and revert: after a
    resize run in this process); returns the migration id."""
    if case.scenario == "resize" or case.scenario == "resize-rollback":
        arm(env, case.faults, fault_ids)
        CONF.set_override("enabled", True, group="jobboard")
        return env.api.resize(env.uuid, "m4", host=DEST, wait=False)["uuid"]
    mig = env.api.resize(env.uuid, "m4", host=DEST)
    assert mig["status"] == "finished", mig["error"]
    arm(env, case.faults, fault_ids)
    CONF.set_override("enabled", True, group="jobboard")
    call = env.api.confirm_resize if case.scenario == "confirm" else env.api.revert_resize
    return call(mig["uuid"], wait=False)["uuid"]


def assert_end_state(env, mig, scenario):
    db, driver, uuid = env.db, env.driver, env.uuid
    assert mig["current_step"] is None
    if scenario == "resize-rollback":
        assert "injected fault in finish_migration" in mig["error"]
    on_dest = scenario in ("resize", "confirm")
    host = DEST if on_dest else SOURCE
    flavor = M4 if on_dest else M2
    inst = db.get_instance(uuid)
    vm_state = "resized" if scenario == "resize" else "active"
    assert (inst["host"], inst["vm_state"], inst["task_state"], inst["power_state"],
            (inst["memory_mb"], inst["vcpus"], inst["disk_gb"])) == (
        host, vm_state, None, "running", flavor)
    guests = {h: [(g["state"], (g["memory_mb"], g["vcpus"], g["disk_gb"]))
                  for g in driver.guests(h) if g["uuid"] == uuid] for h in HOSTS}
    expected = {h: [] for h in HOSTS}
    expected[host] = [("running", flavor)]
    if scenario == "resize":  # the source keeps its stopped guest until confirm/revert
        expected[SOURCE] = [("shutdown", M2)]
    assert guests == expected
    ports = {p["id"] for p in db.list_ports(uuid)}
    volumes = {b["volume_id"] for b in db.list_block_devices(uuid)}
    assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(uuid)} == {
        (p, host, "ACTIVE") for p in ports}
    assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(uuid)} == {
        (v, host) for v in volumes}
    for h in HOSTS:
        here = h == host
        assert {v["port_id"] for v in driver.vifs(h)} == (ports if here else set()), h
        assert {v["volume_id"] for v in driver.volume_connections(h)} == (
            volumes if here else set()), h
    disks = {h: sorted((f["path"], f["disk_gb"]) for f in driver.files(h)) for h in HOSTS}
    path = DISK.format(uuid=uuid)
    want = {"host-a": [(path, 20)], "host-b": [(path, 20)], "host-c": [(path, 40)]}
    if scenario == "confirm":
        want["host-a"] = want["host-b"] = []
    elif scenario in ("revert", "resize-rollback"):
        want["host-c"] = []
    assert disks == want
    assert db.list_claims() == []
    held = {SOURCE: M2, DEST: M4} if scenario == "resize" else {host: flavor}
    assert usage(db) == {h: held.get(h, (0, 0, 0)) for h in HOSTS}
    reservations = [(r["cores"], r["ram_mb"]) for r in db.list_quota_reservations()]
    assert reservations == ([(0, 0)] if scenario == "resize" else [])
    assert driver.side_effects(uuid) == SIDE_EFFECTS[scenario], \
        "hypervisor side effects differ from a run without crash"


def test_matrix_covers_every_atom():
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES)
    for scenario in ("resize", "confirm", "revert"):
        for atom in ATOMS[scenario]:
            assert {f"{scenario}-kill-at-{atom}-RUNNING",
                    f"{scenario}-kill-at-{atom}-SUCCESS"} <= ids
    for atom in ROLLBACK_ATOMS:
        assert {f"resize-rollback-kill-at-{atom}-REVERTING",
                f"resize-rollback-kill-at-{atom}-REVERTED"} <= ids
    assert "choose-resize-destination-retry" in ATOMS["resize"]
