"""Notifications (issue 6): the exact sequence of events a live migration, a
rolled-back live migration and a resize send, received through a real
RabbitMQ queue (reachable on this machine kind) and through oslo.messaging's
in-memory fake transport; the in-process subscribers; instance.update as
``notify_on_state_change`` selects; versioned payloads; and a flow resumed
after its conductor was SIGKILLed does not send again what the dead one sent.

The conductors are real processes (tests/crash_conductor.py) on a real
ZooKeeper; RabbitMQ is the machine's real broker (guest/guest on loopback)."""
import contextlib
import json
import signal
import socket
import threading
import time
import uuid

import pytest

from crash_harness import Env, persisted_state, wait_until
from migrateflow import api, context, engine, notifications
from migrateflow.conf import CONF
from migrateflow.db import api as db_api

RABBIT = ("127.0.0.1", 5672)
RABBIT_URL = "rabbit://guest:guest@127.0.0.1:5672/"

CHECK, PRE, COPY, POST, ROLLBACK = (f"instance.live_migration{p}" for p in
                                    ("_check", "_pre", "", "_post", "_rollback"))
UPDATE = ("instance.update", "INFO")


def _phase(name, *stages):
    return [(f"{name}.{s}", "ERROR" if s == "error" else "INFO") for s in stages]


#: an uninterrupted live migration (vm_and_task_state)
LIVE = [UPDATE, *_phase(CHECK, "start", "end"), *_phase(PRE, "start", "end"),
        *_phase(COPY, "start", "end"), *_phase(POST, "start"), UPDATE, *_phase(POST, "end")]
#: pre_live_migration fails: the rollback leaves the guest on the source
LIVE_ROLLED_BACK = [UPDATE, *_phase(CHECK, "start", "end"), *_phase(PRE, "start", "error"),
                    *_phase(ROLLBACK, "start"), UPDATE, *_phase(ROLLBACK, "end")]
#: a resize: RESIZE_PREP → RESIZE_MIGRATING → RESIZE_MIGRATED → RESIZE_FINISH → RESIZED
RESIZE = [UPDATE, *_phase("instance.resize_prep", "start", "end"),
          *_phase("instance.resize", "start"), UPDATE, *_phase("instance.resize", "end"),
          *_phase("instance.resize_finish", "start"), UPDATE, UPDATE, UPDATE,
          *_phase("instance.resize_finish", "end")]


def _rabbit_reachable():
    with contextlib.suppress(OSError), socket.create_connection(RABBIT, timeout=1):
        return True
    return False


class RabbitQueue:
    """Reads the notifications of ``topic`` from the broker's queues
    ``topic.info`` and ``topic.error`` (declared by oslo.messaging's
    notifier when it sends), in the order they were sent."""

    def __init__(self, topic):
        import kombu
        self.topic = topic
        self.conn = kombu.Connection("amqp://guest:guest@127.0.0.1:5672//")

    def received(self):
        messages = []
        channel = self.conn.default_channel
        for priority in ("info", "error"):
            with contextlib.suppress(Exception):  # not declared: nothing sent
                while (msg := channel.basic_get(f"{self.topic}.{priority}", no_ack=True)):
                    inner = json.loads(json.loads(msg.body)["oslo.message"])
                    messages.append({
                        "event_type": inner["event_type"], "priority": inner["priority"],
                        "timestamp": inner["timestamp"], "payload": inner["payload"],
                        "request_id": _data(inner)["request_id"]})
        return sorted(messages, key=lambda m: m["timestamp"])

    def close(self):
        channel = self.conn.default_channel
        for priority in ("info", "error"):
            with contextlib.suppress(Exception):
                channel.queue_delete(f"{self.topic}.{priority}")
        self.conn.release()


class FakeTransportQueue:
    """oslo.messaging's in-memory fake transport and a notification
    listener on it (this process only)."""

    def __init__(self, topic, conf):
        oslo_messaging, _opts = notifications._messaging()
        self.messages, self.lock = [], threading.Lock()
        transport = oslo_messaging.get_notification_transport(conf, url="fake:/")
        queue = self

        class Endpoint:
            def info(self, ctxt, publisher_id, event_type, payload, metadata):
                queue.add(ctxt, event_type, "INFO", payload, metadata)

            def error(self, ctxt, publisher_id, event_type, payload, metadata):
                queue.add(ctxt, event_type, "ERROR", payload, metadata)

        self.listener = oslo_messaging.get_notification_listener(
            transport, [oslo_messaging.Target(topic=topic)], [Endpoint()],
            executor="threading")
        self.listener.start()

    def add(self, ctxt, event_type, priority, payload, metadata):
        with self.lock:
            self.messages.append({"event_type": event_type, "priority": priority,
                                  "timestamp": metadata["timestamp"], "payload": payload,
                                  "request_id": _data({"payload": payload})["request_id"]})

    def received(self, count=None):
        if count is not None:
            wait_until_count(lambda: len(self.messages) >= count)
        with self.lock:
            return sorted(self.messages, key=lambda m: m["timestamp"])

    def close(self):
        self.listener.stop()
        self.listener.wait()


def wait_until_count(predicate, timeout=10.0):
    """Wait for ``predicate`` (the assertions after it tell what was
    missing when it never held)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(params=["rabbitmq", "fake-transport"])
def bus(request, conf):
    """Notifications sent through oslo.messaging (messagingv2) to a topic of
    this test's, on RabbitMQ or on the fake transport."""
    topic = f"migrateflow-test-{uuid.uuid4().hex[:8]}"
    notifications.register_messaging_opts(conf)
    if request.param == "rabbitmq":
        if not _rabbit_reachable():
            pytest.skip("no RabbitMQ on 127.0.0.1:5672: the fake-transport case "
                        "checks the same sequences")
        url = RABBIT_URL
    else:
        url = "fake:/"
    for name, value in (("driver", ["messagingv2"]), ("transport_url", url),
                        ("topics", [topic])):
        conf.set_override(name, value, group="oslo_messaging_notifications")
    conf.set_override("notify_on_state_change", "vm_and_task_state", group="notifications")
    notifications.reset()
    queue = RabbitQueue(topic) if request.param == "rabbitmq" else \
        FakeTransportQueue(topic, conf)
    yield queue
    queue.close()
    notifications.reset()
    for name in ("driver", "transport_url", "topics"):
        conf.clear_override(name, group="oslo_messaging_notifications")
    conf.clear_override("notify_on_state_change", group="notifications")


@pytest.fixture
def heard():
    """What an in-process subscriber hears."""
    messages = []
    handle = notifications.subscribe(messages.append)
    yield messages
    notifications.unsubscribe(handle)


def _kinds(messages):
    return [(m["event_type"], m["priority"]) for m in messages]


def _data(message):
    return message["payload"]["migrateflow_object.data"]


def _received(bus, expected):
    if isinstance(bus, FakeTransportQueue):
        return bus.received(len(expected))
    return bus.received()


CALLER = context.make_context("alice", "ops", ["admin"], request_id="req-" + "1" * 32)


def test_live_migration_sends_the_expected_sequence(bus, heard, small_cloud, db):
    uuid_ = small_cloud["instance"]["uuid"]
    mig = api.MigrationAPI(context=CALLER).live_migrate(uuid_, "host-b")
    assert mig["status"] == "completed"
    got = _received(bus, LIVE)
    assert _kinds(got) == LIVE
    assert _kinds(heard) == LIVE  # the in-process subscriber hears the same
    assert {m["request_id"] for m in got} == {CALLER.request_id}
    for message in got:
        assert message["payload"]["migrateflow_object.namespace"] == "migrateflow"
        assert message["payload"]["migrateflow_object.version"] == "1.0"
    claim, moved = [_data(m) for m in got if m["event_type"] == "instance.update"]
    assert (claim["old_task_state"], claim["task_state"], claim["host"]) == \
        (None, "migrating", "host-a")
    assert (moved["old_task_state"], moved["task_state"], moved["host"], moved["state"]) == \
        ("migrating", None, "host-b", "active")
    assert moved["migration_id"] == mig["uuid"]
    copy_start = next(_data(m) for m in got if m["event_type"] == f"{COPY}.start")
    assert (copy_start["migration_id"], copy_start["source_host"], copy_start["dest_host"],
            copy_start["step"], copy_start["migration_type"]) == \
        (mig["uuid"], "host-a", "host-b", "live-migration", "live-migration")
    assert heard[0]["context"]["user_id"] == "alice"
    assert {(_data(m)["action_initiator_user"], _data(m)["action_initiator_project"])
            for m in got} == {("alice", "ops")}


def test_rolled_back_live_migration_sends_error_and_rollback(bus, heard, small_cloud, db,
                                                            driver):
    uuid_ = small_cloud["instance"]["uuid"]
    driver.inject_fault("pre_live_migration", instance=uuid_, message="boom")
    mig = api.MigrationAPI(context=CALLER).live_migrate(uuid_, "host-b")
    assert mig["status"] == "failed"
    assert db.get_instance(uuid_)["host"] == "host-a"
    got = _received(bus, LIVE_ROLLED_BACK)
    assert _kinds(got) == LIVE_ROLLED_BACK
    error = next(_data(m) for m in got if m["event_type"] == f"{PRE}.error")
    assert error["step"] == "pre-live-migration"
    assert error["error"] == {"type": "migrateflow.exceptions.InjectedFault", "message": "boom"}
    assert _data(got[-1])["status"] == "failed"


def test_resize_sends_the_expected_sequence(bus, heard, small_cloud, db):
    uuid_ = small_cloud["instance"]["uuid"]
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    mig = api.MigrationAPI(context=CALLER).resize(uuid_, "m4", "host-c")
    assert mig["status"] == "finished"
    got = _received(bus, RESIZE)
    assert _kinds(got) == RESIZE
    states = [(d["old_state"], d["state"], d["old_task_state"], d["task_state"])
              for d in map(_data, got) if "state" in d]
    assert states == [("active", "active", None, "resize_prep"),
                      ("active", "active", "resize_prep", "resize_migrating"),
                      ("active", "active", "resize_migrating", "resize_migrated"),
                      ("active", "active", "resize_migrated", "resize_finish"),
                      ("active", "resized", "resize_finish", None)]


@pytest.mark.parametrize("mode, updates", [
    (None, []),
    ("vm_state", [("active", "resized")]),
    ("vm_and_task_state", [("active", "active")] * 4 + [("active", "resized")]),
])
def test_notify_on_state_change_selects_instance_updates(mode, updates, heard, small_cloud,
                                                         db, conf):
    conf.set_override("notify_on_state_change", mode, group="notifications")
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    api.MigrationAPI().resize(small_cloud["instance"]["uuid"], "m4", "host-c")
    assert [(d["old_state"], d["state"]) for d in map(_data, heard)
            if "old_state" in d] == updates
    assert [m["event_type"] for m in heard if m["event_type"] != "instance.update"] == \
        [e for e, _p in RESIZE if e != "instance.update"]
    conf.clear_override("notify_on_state_change", group="notifications")


def test_rolled_back_change_is_not_announced(heard, small_cloud, db, conf):
    conf.set_override("notify_on_state_change", "vm_and_task_state", group="notifications")
    uuid_ = small_cloud["instance"]["uuid"]
    with pytest.raises(RuntimeError):
        with db.engine.begin() as conn:
            from migrateflow.db import models as m
            conn.execute(m.instances.update().where(m.instances.c.uuid == uuid_).values(
                vm_state="error"))
            raise RuntimeError("rolled back")
    db.update_instance(uuid_, vm_state="stopped")
    assert [(d["old_state"], d["state"]) for d in map(_data, heard)] == [("active", "stopped")]
    conf.clear_override("notify_on_state_change", group="notifications")


def test_subscriber_filters_and_a_failing_subscriber_changes_nothing(small_cloud):
    starts = []
    good = notifications.subscribe(starts.append, event_types={f"{COPY}.start"})
    bad = notifications.subscribe(lambda m: 1 / 0)
    try:
        mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    finally:
        notifications.unsubscribe(good)
        notifications.unsubscribe(bad)
    assert mig["status"] == "completed"
    assert [m["event_type"] for m in starts] == [f"{COPY}.start"]


def test_no_broker_configured_sends_nothing_and_loads_no_transport(conf, small_cloud):
    notifications.reset()
    assert notifications._notifier(conf) is None
    mig = api.MigrationAPI().live_migrate(small_cloud["instance"]["uuid"], "host-b")
    assert mig["status"] == "completed"


# -- a resumed flow does not send again what was sent ------------------------------------
@pytest.fixture
def crash_env(zk_conf, zk_hosts, small_cloud, db, driver, zygote, tmp_path, monkeypatch):
    from futurist import _thread as futurist_thread

    from crash_harness import WORKER_IDLE
    CONF.set_override("enabled", True, group="jobboard")
    CONF.set_override("notify_on_state_change", "vm_and_task_state", group="notifications")
    monkeypatch.setattr(futurist_thread.ThreadWorker, "MAX_IDLE_FOR", WORKER_IDLE)
    env = Env(tmp_path, zk_hosts, db, driver, zygote, small_cloud["instance"])
    env.events = str(tmp_path / "events")
    yield env
    env.stop_all()
    engine.reset()
    CONF.clear_override("enabled", group="jobboard")
    CONF.clear_override("notify_on_state_change", group="notifications")


def _conductor_events(env):
    with open(env.events) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kill_at, fault, expected", [
    # A dies as the first step of a phase starts: the phase's start was sent
    ("bind-destination-ports:RUNNING", None, LIVE),
    # A dies between the copy and the post steps
    ("live-migration:SUCCESS", None, LIVE),
    # A dies with the guest already on the destination, mid post steps
    ("activate-destination-ports:RUNNING", None, LIVE),
    # A dies in the rollback: the error and the rollback's start were sent
    ("bind-destination-ports:REVERTING", "pre_live_migration", LIVE_ROLLED_BACK),
])
def test_resumed_flow_does_not_send_finished_steps_again(kill_at, fault, expected, crash_env,
                                                          heard, db, driver):
    env = crash_env
    if fault:
        driver.inject_fault(fault, instance=env.uuid, message="boom")
    a = env.start("A", kill_at=kill_at)
    mig = api.MigrationAPI(context=CALLER).live_migrate(env.uuid, host="host-b", wait=False)
    assert a.wait(30) == -signal.SIGKILL, env.logs()
    name, _, state = kill_at.rpartition(":")
    assert persisted_state(db.get_migration(mig["uuid"])["flow_uuid"], name) == state
    by_a = _conductor_events(env)
    env.start("B")
    final = env.api.wait(mig["uuid"], timeout=60)
    assert final["status"] == ("failed" if fault else "completed"), final["error"]
    wait_until(lambda: len(_conductor_events(env)) + len(heard) >= len(expected), 15,
               "B's last events", env)
    events = heard + _conductor_events(env)  # the claim is announced by the API here
    assert _kinds(events) == expected, [(e.get("label"), e["event_type"]) for e in events]
    assert {e["label"] for e in by_a} == {"A"} and len(by_a) < len(events) - len(heard)
    assert {e["context"]["request_id"] for e in events} == {CALLER.request_id}
    where = "host-a" if fault else "host-b"
    assert db.get_instance(env.uuid)["host"] == where
    assert [g["uuid"] for g in driver.guests(where)] == [env.uuid]


def test_instance_update_names_its_migration_only_inside_a_flow(heard, small_cloud, conf):
    conf.set_override("notify_on_state_change", "vm_and_task_state", group="notifications")
    uuid_ = small_cloud["instance"]["uuid"]
    db_api.get_db().update_instance(uuid_, task_state="migrating")
    db_api.get_db().update_instance(uuid_, task_state=None)
    assert [_data(m)["migration_id"] for m in heard] == [None, None]
    conf.clear_override("notify_on_state_change", group="notifications")


def _aborted(client, db, driver, uuid_, _prepared):
    """A live migration aborted by the operator in the middle of its copy."""
    driver.inject_fault("get_migration_job", action="hang", instance=uuid_, count=-1)
    mig = client.live_migrate(uuid_, "host-b", wait=False)
    wait_until_count(lambda: db.get_migration(mig["uuid"])["status"] == "running")
    client.abort(mig["uuid"])
    driver.clear_faults()
    return client.wait(mig["uuid"], timeout=60)


def _cold_migrated(client, db, driver, uuid_):
    """A finished cold migration (made before the events are listened to)."""
    return client.migrate(uuid_, "host-c")["uuid"]


def _reverted(client, db, driver, uuid_, migration_id):
    return client.revert_resize(migration_id)


def _confirmed(client, db, driver, uuid_, migration_id):
    return client.confirm_resize(migration_id)


def _host_down(client, db, driver, uuid_):
    db.update_host("host-a", up=False)


def _evacuated(client, db, driver, uuid_, _prepared):
    return client.evacuate(uuid_, "host-b")


@pytest.mark.parametrize("prepare, operation, status, expected", [
    (None, _aborted, "cancelled",
     [UPDATE, *_phase(CHECK, "start", "end"), *_phase(PRE, "start", "end"),
      *_phase(COPY, "start"), *_phase("instance.live_migration_abort", "start"),
      *_phase(COPY, "error"), *_phase(ROLLBACK, "start"), UPDATE, *_phase(ROLLBACK, "end"),
      *_phase("instance.live_migration_abort", "end")]),
    (_cold_migrated, _reverted, "reverted",
     [UPDATE, *_phase("instance.resize_revert", "start"), UPDATE,
      *_phase("instance.resize_revert", "end")]),
    (_cold_migrated, _confirmed, "confirmed",
     [*_phase("instance.resize_confirm", "start"), UPDATE,
      *_phase("instance.resize_confirm", "end")]),
    (_host_down, _evacuated, "done",
     [UPDATE, *_phase("instance.evacuate", "start", "end"),
      *_phase("instance.rebuild", "start"), UPDATE, *_phase("instance.rebuild", "end")]),
])
def test_other_operations_send_their_phases(prepare, operation, status, expected,
                                            small_cloud, db, driver, conf):
    conf.set_override("notify_on_state_change", "vm_and_task_state", group="notifications")
    client = api.MigrationAPI(context=CALLER)
    uuid_ = small_cloud["instance"]["uuid"]
    prepared = prepare(client, db, driver, uuid_) if prepare else None
    heard = []
    handle = notifications.subscribe(heard.append)
    try:
        final = operation(client, db, driver, uuid_, prepared)
    finally:
        notifications.unsubscribe(handle)
        conf.clear_override("notify_on_state_change", group="notifications")
    assert final["status"] == status, final["error"]
    assert _kinds(heard) == expected
    assert {_data(m)["request_id"] for m in heard} == {CALLER.request_id}
