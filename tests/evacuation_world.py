"""The evacuation tests' world (tests/test_evacuation.py,
tests/test_evacuation_host.py): the small cloud's host-a dies, its vm-1 is
evacuated; helpers that read the end state in the database and the fake
hypervisors.  Test code, not product code.

small_cloud: host-a and host-b share storage (nfs-1), host-c is local;
vm-1 (2 ports, 1 volume) runs on host-a, which the tests crash.
"""
import functools
import inspect

import pytest

import task_checks
from helpers import snapshot
from migrateflow import api
from migrateflow.flows import evacuation

SOURCE, SHARED, LOCAL = "host-a", "host-b", "host-c"
DESTS = pytest.mark.parametrize("dest", [SHARED, LOCAL])


def flow_tasks():
    return list(task_checks.tasks_of(evacuation.build()))


STEPS = [task.name for task in flow_tasks()]
PROVIDES = {task.name: [str(key) for key in task.provides] for task in flow_tasks()}
TASK_CLASSES = {task.name: type(task) for task in flow_tasks()}
UNDOING_STEPS = ["claim-destination-resources", "bind-ports-on-destination",
                 "connect-volumes-on-destination", "rebuild-on-destination"]


def _api(*listeners):
    return api.MigrationAPI(listeners=listeners)


def crash(db, driver, host=SOURCE):
    """The host dies: unreachable hypervisor, guests off, DB row down."""
    driver.crash_host(host)
    db.update_host(host, up=False)


def come_back(db, driver, host=SOURCE):
    driver.set_host_up(host, True)
    return _api().host_started(host)


@pytest.fixture
def dead_cloud(small_cloud, db, driver):
    crash(db, driver)
    return small_cloud["instance"]


def ports_of(db, uuid):
    return {p["id"] for p in db.list_ports(uuid)}


def volumes_of(db, uuid):
    return {b["volume_id"] for b in db.list_block_devices(uuid)}


def guests(driver, host):
    return [(g["uuid"], g["state"]) for g in driver.guests(host)]


def assert_evacuated(db, driver, uuid, dest, power="running",
                     source_usage=(0, 0, 0)):
    """The instance lives on ``dest``: DB records and the hypervisor agree;
    no other live host has anything of it; no claim is left."""
    inst = db.get_instance(uuid)
    vm_state = "active" if power == "running" else "stopped"
    assert (inst["host"], inst["vm_state"], inst["task_state"], inst["power_state"]) == (
        dest, vm_state, None, power)
    assert guests(driver, dest) == [(uuid, power)]
    ports, volumes = ports_of(db, uuid), volumes_of(db, uuid)
    assert {(b["port_id"], b["host"], b["status"]) for b in db.list_port_bindings(uuid)} \
        == {(p, dest, "ACTIVE") for p in ports}
    assert {v["port_id"] for v in driver.vifs(dest)} == ports
    assert {(v["volume_id"], v["host"]) for v in db.list_volume_connections(uuid)} \
        == {(v, dest) for v in volumes}
    assert {v["volume_id"] for v in driver.volume_connections(dest)} == volumes
    for other in {SHARED, LOCAL} - {dest}:
        assert (driver.guests(other), driver.vifs(other),
                driver.volume_connections(other)) == ([], [], [])
    assert db.list_claims() == []
    usage = {h["name"]: (h["memory_used_mb"], h["vcpus_used"], h["disk_used_gb"])
             for h in db.list_hosts() if h["name"] in (SOURCE, SHARED, LOCAL)}
    assert usage == {SOURCE: source_usage, SHARED: (0, 0, 0), LOCAL: (0, 0, 0),
                     dest: (2048, 2, 20)}


def instance_dir(uuid):
    return f"/var/lib/migrateflow/instances/{uuid}"


def has_disk(driver, host, uuid):
    return instance_dir(uuid) in [f["path"] for f in driver.files(host)]


def spy(monkeypatch, driver, method):
    """Record the keyword arguments of every call of a driver method."""
    calls = []
    real = getattr(driver, method)
    signature = inspect.signature(real)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, method, wrapper)
    return calls


class Evacuation:
    """An evacuation of vm-1 accepted through the API and the flow store as
    the real steps run so far filled it."""

    def __init__(self, db, driver, instance_id, dest):
        self.db, self.driver, self.instance_id = db, driver, instance_id
        mig, store = api.MigrationAPI()._accept_evacuation(instance_id, dest)
        self.id = mig["uuid"]
        self.store = {str(key): value for key, value in store.items()}
        self.store["candidate"] = self.store["candidates"][0]
        self.done = 0

    def execute(self, task):
        result = task.execute(**{a: self.store[k] for a, k in task.rebind.items()})
        if self.done < len(STEPS) and task.name == STEPS[self.done]:
            self.done += 1
        for key in PROVIDES[task.name]:
            self.store[key] = result
        return result

    def revert(self, task, result=None, flow_failures=None):
        args = {a: self.store[k] for a, k in task.revert_rebind.items()}
        return task.revert(result=result, flow_failures=flow_failures or {}, **args)

    def run_until(self, step):
        for task in flow_tasks()[self.done:STEPS.index(step)]:
            self.execute(task)
        return self

    def migration(self):
        mig = self.db.get_migration(self.id)
        mig.pop("updated_at")
        return mig

    def instance(self):
        return self.db.get_instance(self.instance_id)

    def state(self, side_effects=True):
        state = {"snapshot": snapshot(self.db, self.driver, self.instance_id),
                 "migration": self.migration()}
        if side_effects:
            state["side_effects"] = self.driver.counters()
            state["timeline"] = [(e["event"], e["host"]) for e in self.driver.timeline()]
        return state


@pytest.fixture
def evac(small_cloud, db, driver):
    """Factory: crash host-a (unless ``crashed`` is False: then it is only
    forced down, its hypervisor still answering), accept an evacuation of
    vm-1 to ``dest`` and run the flow's steps before ``upto``."""
    def make(dest=SHARED, upto=None, crashed=True):
        if crashed:
            crash(db, driver)
        else:
            db.update_host(SOURCE, forced_down=True)
        mig = Evacuation(db, driver, small_cloud["instance"]["uuid"], dest)
        return mig.run_until(upto) if upto else mig
    return make
