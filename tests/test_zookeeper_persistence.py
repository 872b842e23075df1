"""Flow persistence on a real ZooKeeper (TaskFlow's own ZkBackend), and the
test server helpers it relies on (restart, session expiry).

Every test gets its own chroot (``zk_hosts``), so flow details never leak
between tests; the server is the session's (``zk_server``) unless a test
restarts it (``zk_private_server``).
"""
import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest
import taskflow.engines
from kazoo.client import KazooClient
from kazoo.protocol.states import KazooState
from taskflow import states
from taskflow.persistence import backends as tf_backends
from taskflow.persistence import models
from taskflow.persistence.backends import impl_zookeeper

import logged_flow
import servers
from helpers import snapshot
from migrateflow import api, engine, graph
from migrateflow.flows import live_migration

FLOW_PATH = "/flows"
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _backend(hosts, path=FLOW_PATH):
    """A new ZkBackend (its own kazoo client): what another process sees.

    Built with ``fetch`` and explicit ``hosts``: the URI form
    ``zookeeper://127.0.0.1:PORT`` does NOT work (TaskFlow turns the URI's
    host into a ``hostname`` key the ZooKeeper backend ignores, and it
    connects to localhost:2181 instead).
    """
    backend = tf_backends.fetch({"connection": "zookeeper://", "hosts": hosts,
                                 "path": path, "timeout": 10.0})
    assert isinstance(backend, impl_zookeeper.ZkBackend)
    with contextlib.closing(backend.get_connection()) as conn:
        conn.upgrade()  # the compatibility check (envi) runs here too
    return backend


@pytest.fixture
def zk_backend(zk_hosts):
    backend = _backend(zk_hosts)
    yield backend
    backend.close()


@contextlib.contextmanager
def _kazoo(hosts, timeout=10.0, **kwargs):
    client = KazooClient(hosts=hosts, timeout=timeout, **kwargs)
    client.start(timeout=15)
    try:
        yield client
    finally:
        client.stop()
        client.close()


# ----------------------------------------------------------------- the flow
_Crash = logged_flow.Crash
_log_lines = logged_flow.log_lines


def chain_flow(log, crash_flag=None, crash="raise", fail_at=None, n=4):
    """Module-level factory (load_from_detail re-imports it by name)."""
    return logged_flow.chain(logged_flow.PositionStep, log, crash_flag, crash, fail_at, n)


def _run_until_killed(hosts, log, flag):
    """Run in a child process: start chain_flow, get SIGKILLed in s2."""
    backend = _backend(hosts)
    eng = taskflow.engines.load_from_factory(
        chain_flow, factory_args=[log], factory_kwargs={"crash_flag": flag, "crash": "kill"},
        store={"x": 1}, backend=backend, book=models.LogBook("killed"), engine="serial")
    print(eng.storage.flow_uuid, flush=True)
    eng.run()


# -------------------------------------------------------------------- tests
def test_failing_flow_reverts_and_persists(zk_backend, zk_hosts, tmp_path):
    log = str(tmp_path / "log")
    book = models.LogBook("run")
    eng = taskflow.engines.load(chain_flow(log, fail_at=2), store={"x": 1},
                                backend=zk_backend, book=book)
    with pytest.raises(RuntimeError, match="step s2 failed"):
        eng.run()
    assert _log_lines(log) == ["execute s0", "execute s1", "execute s2",
                               "revert s2", "revert s1", "revert s0"]

    fresh = _backend(zk_hosts)
    try:
        conn = fresh.get_connection()
        fd = conn.get_flow_details(eng.storage.flow_uuid)
        assert fd.state == states.REVERTED
        by_name = {ad.name: ad for ad in fd}
        assert set(by_name) == {"s0", "s1", "s2", "s3", "_TaskFlow_INJECTOR"}
        for name in ("s0", "s1", "s2"):
            assert by_name[name].state == states.REVERTED
            assert by_name[name].intention == states.REVERT
        assert by_name["s3"].state == states.PENDING  # never ran
        # plus TaskFlow's own injector atom (the store given to the engine)
        # the revert order, as persisted: the failed task first, then back
        assert {n: by_name[n].revert_results for n in ("s0", "s1", "s2")} == {
            "s2": 1, "s1": 2, "s0": 3}
        assert by_name["s1"].results == 3  # REVERTED keeps the result...
        assert by_name["s2"].failure.exception_str == "step s2 failed"
        assert by_name["s2"].failure.check(RuntimeError)  # ...and the failure
        assert {fd.uuid for fd in conn.get_logbook(book.uuid)} == {fd.uuid}
    finally:
        fresh.close()
    # the data are znodes under the backend path inside the test's chroot
    with _kazoo(zk_hosts) as client:
        assert sorted(client.get_children(FLOW_PATH)) == [
            "atom_details", "books", "flow_details"]
        assert len(client.get_children(FLOW_PATH + "/atom_details")) == 5


@pytest.mark.parametrize("engine_kind", ["serial", "parallel"])
def test_resume_after_interruption(zk_backend, zk_hosts, tmp_path, engine_kind):
    log, flag = str(tmp_path / "log"), str(tmp_path / "crash")
    open(flag, "w").close()
    eng = taskflow.engines.load_from_factory(
        chain_flow, factory_args=[log], factory_kwargs={"crash_flag": flag},
        store={"x": 1}, backend=zk_backend, book=models.LogBook("resume"),
        engine=engine_kind)
    with pytest.raises(_Crash):
        eng.run()
    zk_backend.close()  # the "process" is gone with its ZooKeeper client
    assert _log_lines(log) == ["execute s0", "execute s1", "execute s2"]
    _resume_and_check(zk_hosts, eng.storage.flow_uuid, log, engine_kind)


def test_resume_after_process_killed(zk_hosts, tmp_path):
    """SIGKILL in the middle of a task: what ZooKeeper holds is enough."""
    log, flag = str(tmp_path / "log"), str(tmp_path / "crash")
    open(flag, "w").close()
    code = ("import sys; sys.path.insert(0, %r); import test_zookeeper_persistence as m; "
            "m._run_until_killed(%r, %r, %r)" % (TESTS_DIR, zk_hosts, log, flag))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, cwd=TESTS_DIR)
    assert proc.returncode == -9, proc.stderr
    flow_uuid = proc.stdout.split()[0]
    assert _log_lines(log) == ["execute s0", "execute s1", "execute s2"]
    _resume_and_check(zk_hosts, flow_uuid, log, "serial")


def _resume_and_check(hosts, flow_uuid, log, engine_kind):
    fresh = _backend(hosts)  # "another process"
    try:
        fd = fresh.get_connection().get_flow_details(flow_uuid)
        assert fd.state == states.RUNNING
        assert {ad.name: ad.state for ad in fd if not ad.name.startswith("_")} == {
            "s0": states.SUCCESS, "s1": states.SUCCESS,
            "s2": states.RUNNING, "s3": states.PENDING}
        resumed = taskflow.engines.load_from_detail(fd, backend=fresh,
                                                    engine=engine_kind)
        resumed.run()
        # completed tasks are not run again; the interrupted one is
        assert _log_lines(log)[3:] == ["execute s2", "execute s3"]
        assert resumed.storage.fetch("v3") == 5
        final = fresh.get_connection().get_flow_details(flow_uuid)
        assert final.state == states.SUCCESS
        assert {ad.state for ad in final} == {states.SUCCESS}
    finally:
        fresh.close()


def test_live_migration_with_zookeeper_persistence(zk_conf, zk_hosts, small_cloud, db,
                                                    driver):
    """The product path: ``[persistence] backend = zookeeper`` keeps the
    flow details in ZooKeeper ([jobboard] hosts + [persistence]
    zookeeper_path), not in the state database."""
    zk_conf.set_override("backend", "zookeeper", group="persistence")
    assert isinstance(engine.get_backend(), impl_zookeeper.ZkBackend)
    inst = small_cloud["instance"]
    before = snapshot(db, driver, inst["uuid"])

    mig = api.MigrationAPI().live_migrate(inst["uuid"], "host-b")

    assert (mig["status"], mig["dest_host"]) == ("completed", "host-b")
    assert mig["flow_uuid"]
    after = snapshot(db, driver, inst["uuid"])
    assert after["instance"]["host"] == "host-b" != before["instance"]["host"]
    assert after["claims"] == []

    fresh = _backend(zk_hosts, zk_conf.persistence.zookeeper_path)
    try:
        fd = fresh.get_connection().get_flow_details(mig["flow_uuid"])
    finally:
        fresh.close()
    assert fd.state == states.SUCCESS
    atoms = {ad.name: ad.state for ad in fd}
    flow_steps = set(graph.execution_order(graph.describe(live_migration.build())))
    assert "complete-live-migration" in flow_steps and flow_steps <= set(atoms)
    assert {atoms[name] for name in flow_steps} == {states.SUCCESS}
    # migrateflow's own reading of the flow (migration-show) finds it too
    listed = engine.flow_atoms(mig["flow_uuid"], live_migration.build)
    assert listed and listed[-1]["name"] == "complete-live-migration"
    assert {a["state"] for a in listed} == {states.SUCCESS}


def test_server_restart_keeps_data(zk_private_server):
    server = zk_private_server
    hosts, port = server.hosts, server.port
    backend = _backend(hosts)
    book = models.LogBook("survives")
    book.add(models.FlowDetail("flow", uuid="00000000-0000-0000-0000-000000000001"))
    with contextlib.closing(backend.get_connection()) as conn:
        conn.save_logbook(book)
    backend.close()
    states_seen = []
    # kazoo's default reconnection backs off exponentially (0.1 s doubling,
    # not reset by the connections a starting server drops): retry steadily
    steady = {"max_tries": -1, "delay": 0.1, "backoff": 1, "max_jitter": 0.1}
    with _kazoo(hosts, timeout=20.0, connection_retry=steady) as client:
        client.add_listener(states_seen.append)
        client.create("/keep/me", b"payload", makepath=True)
        session_id = client.client_id[0]

        started = time.monotonic()
        server.restart()
        assert (server.hosts, server.port) == (hosts, port)
        assert time.monotonic() - started < 20

        with _kazoo(hosts) as other:
            assert other.get("/keep/me")[0] == b"payload"
        # the old client reconnects to its session (restored from the
        # server's data)
        deadline = time.monotonic() + 15
        while not (client.connected and states_seen[-1] == KazooState.CONNECTED):
            assert time.monotonic() < deadline, states_seen
            time.sleep(0.05)
        assert KazooState.SUSPENDED in states_seen and KazooState.LOST not in states_seen
        assert client.client_id[0] == session_id
        assert client.get("/keep/me")[0] == b"payload"
    fresh = _backend(hosts)
    try:
        got = fresh.get_connection().get_logbook(book.uuid)
        assert [fd.name for fd in got] == ["flow"]
    finally:
        fresh.close()


def test_expire_session_drops_ephemeral_nodes(zk_hosts):
    lost = threading.Event()
    with _kazoo(zk_hosts, timeout=30.0) as victim, _kazoo(zk_hosts) as watcher:
        victim.add_listener(lambda state: state == KazooState.LOST and lost.set())
        victim.create("/members/victim", b"", ephemeral=True, makepath=True)
        victim.create("/durable", b"stays")
        assert watcher.exists("/members/victim")
        gone = threading.Event()
        watcher.exists("/members/victim", watch=lambda event: gone.set())
        old_session = victim.client_id[0]

        started = time.monotonic()
        assert servers.expire_session(zk_hosts, victim) == old_session
        assert gone.wait(5), "ephemeral node still there"
        assert time.monotonic() - started < 5  # not the 30 s session timeout
        assert watcher.exists("/members/victim") is None
        assert lost.wait(5)
        # kazoo opened a new session; persistent data are untouched
        deadline = time.monotonic() + 10
        while not victim.connected:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert victim.client_id[0] != old_session
        assert victim.get("/durable")[0] == b"stays"
        assert victim.exists("/members/victim") is None
