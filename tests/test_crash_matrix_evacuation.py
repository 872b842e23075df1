"""Crash matrix of the evacuation flow ("Durable execution", as
tests/test_crash_matrix.py does for live migration).

host-a loses power (the fake's ``crash_host``: unreachable, its guests
stopped) and is forced down; each case evacuates the small cloud's
instance from it to host-c (local storage: the guest is rebuilt from the
image) through the jobboard.  Conductor A is SIGKILLed at a chosen point,
conductor B takes the job over once A's ZooKeeper session expired and
finishes it.

* ``evacuate``: ``done``; the instance active and running on host-c, its
  ports, volumes and VIFs there; host-a (still down) keeps its stale copy
  for the day it comes back; host usage moved;
* ``rollback``: the rebuild fails after defining the guest; the rollback
  destroys it: ``failed``, the instance in vm_state error on host-a with
  its ports and volumes, nothing left on host-c.

Kill points: every atom × {RUNNING, SUCCESS} and the flow's SUCCESS; right
after the rebuild's side effect; inside a hung rebuild; for the rollback,
every REVERTING / REVERTED and inside the destination's destroy.  Each case
checks the end state in the database and the fake driver, each hypervisor
side effect exactly once, and from the journal that no finished step ran
again.
"""
import pytest
from futurist import _thread as futurist_thread
from taskflow import states as st

from crash_harness import WORKER_IDLE, Case, Env, arm, assert_no_step_twice, persisted_state
from crash_harness import run_case, usage
from migrateflow import engine, graph
from migrateflow.conf import CONF
from migrateflow.flows import evacuation

pytestmark = pytest.mark.slow

SOURCE, DEST = "host-a", "host-c"
HOSTS = ("host-a", "host-b", "host-c")
ATOMS = graph.execution_order(graph.describe(evacuation.build()))
ROLLBACK_ATOMS = ATOMS[:ATOMS.index("rebuild-on-destination") + 1]
TRIGGER = ("rebuild", "raise", "after", DEST, 1)
SIDE_EFFECTS = {
    "evacuate": {("spawn", SOURCE): 1, ("rebuild", DEST): 1},
    "rollback": {("spawn", SOURCE): 1, ("rebuild", DEST): 1, ("destroy", DEST): 1},
}
FINAL = {"evacuate": ("done", st.SUCCESS), "rollback": ("failed", st.REVERTED)}


def _cases():
    cases = []
    for atom in ATOMS:
        for state in (st.RUNNING, st.SUCCESS):
            cases.append(Case(f"kill-at-{atom}-{state}", "evacuate", kill_at=f"{atom}:{state}"))
    cases.append(Case("kill-at-flow-SUCCESS", "evacuate", kill_at="flow:SUCCESS"))
    cases.append(Case("driver-kill-after-rebuild", "evacuate",
                      faults=(("rebuild", "kill", "after", DEST, 1),),
                      interrupted="rebuild-on-destination:RUNNING"))
    cases.append(Case("hang-rebuild", "evacuate", faults=(("rebuild", "hang", "before", DEST, 1),),
                      hang="rebuild", interrupted="rebuild-on-destination:RUNNING"))
    points = ["rebuild-on-destination:FAILURE"]
    for atom in reversed(ROLLBACK_ATOMS):
        points += [f"{atom}:{st.REVERTING}", f"{atom}:{st.REVERTED}"]
    points.append(f"flow:{st.REVERTED}")
    for point in points:
        cases.append(Case("rollback-kill-at-" + point.replace(":", "-"), "rollback",
                          kill_at=point, faults=(TRIGGER,)))
    cases.append(Case("rollback-driver-kill-after-destroy", "rollback",
                      faults=(TRIGGER, ("destroy", "kill", "after", DEST, 1)),
                      interrupted="rebuild-on-destination:REVERTING"))
    return cases


CASES = _cases()


@pytest.fixture
def env(zk_conf, zk_hosts, small_cloud, db, driver, zygote, tmp_path, monkeypatch):
    driver.crash_host(SOURCE)
    db.update_host(SOURCE, forced_down=True)
    monkeypatch.setattr(futurist_thread.ThreadWorker, "MAX_IDLE_FOR", WORKER_IDLE)
    world = Env(tmp_path, zk_hosts, db, driver, zygote, small_cloud["instance"])
    yield world
    world.stop_all()
    engine.reset()
    CONF.clear_override("enabled", group="jobboard")


def _hypervisor(driver, host, uuid):
    return {"guests": [g["state"] for g in driver.guests(host) if g["uuid"] == uuid],
            "vifs": sorted(v["port_id"] for v in driver.vifs(host) if v["instance"] == uuid),
            "volumes": sorted(v["volume_id"] for v in driver.volume_connections(host)
                              if v["instance"] == uuid),
            "files": sorted(f["path"] for f in driver.files(host) if uuid in f["path"])}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crash(case, env):
    db, driver, uuid = env.db, env.driver, env.uuid
    usage_before = usage(db)
    dead_source = _hypervisor(driver, SOURCE, uuid)

    def post(fault_ids):
        arm(env, case.faults, fault_ids)
        CONF.set_override("enabled", True, group="jobboard")
        return env.api.evacuate(uuid, host=DEST, wait=False)["uuid"]

    final = run_case(env, case, post, FINAL[case.scenario][0])
    try:
        assert persisted_state(final["flow_uuid"], "flow") == FINAL[case.scenario][1]
        assert final["current_step"] is None
        moved = case.scenario == "evacuate"
        host = DEST if moved else SOURCE
        inst = db.get_instance(uuid)
        assert (inst["host"], inst["vm_state"], inst["task_state"]) == (
            host, "active" if moved else "error", None)
        if not moved:
            assert "injected fault in rebuild" in final["error"]
        ports = {p["id"] for p in db.list_ports(uuid)}
        volumes = {b["volume_id"] for b in db.list_block_devices(uuid)}
        assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(uuid)} \
            == {(p, host, "ACTIVE") for p in ports}
        assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(uuid)} == {
            (v, host) for v in volumes}
        assert db.list_claims() == []
        # the dead source is never touched: its stale copy waits for host_started
        assert _hypervisor(driver, SOURCE, uuid) == dead_source
        dest = _hypervisor(driver, DEST, uuid)
        if moved:
            assert dest == {"guests": ["running"], "vifs": sorted(ports),
                            "volumes": sorted(volumes),
                            "files": [f"/var/lib/migrateflow/instances/{uuid}"]}
            assert usage(db) == {SOURCE: (0, 0, 0), "host-b": (0, 0, 0),
                                 DEST: usage_before[SOURCE]}
        else:
            assert dest == {"guests": [], "vifs": [], "volumes": [], "files": []}
            assert usage(db) == usage_before
        assert driver.side_effects(uuid) == SIDE_EFFECTS[case.scenario], \
            "hypervisor side effects differ from a run without crash"
        if moved:
            assert_no_step_twice(env, ATOMS, ())
        else:
            assert_no_step_twice(env, set(ROLLBACK_ATOMS) - {"rebuild-on-destination"},
                                 ROLLBACK_ATOMS)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{env.logs()}") from None


def test_matrix_covers_every_atom():
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES)
    for atom in ATOMS:
        assert {f"kill-at-{atom}-RUNNING", f"kill-at-{atom}-SUCCESS"} <= ids
    for atom in ROLLBACK_ATOMS:
        assert {f"rollback-kill-at-{atom}-REVERTING", f"rollback-kill-at-{atom}-REVERTED"} <= ids
