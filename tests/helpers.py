"""Helpers shared by the flow and API tests: end-state snapshots of the
database and the fake hypervisors, and step-failure injection."""
import functools
import time

from taskflow.listeners import capturing

from migrateflow import exceptions as exc

HOSTS = ("host-a", "host-b", "host-c")


def snapshot(db, driver, instance_uuid, hosts=HOSTS):
    """Everything a migration may touch, minus timestamps and migrations."""
    inst = {k: v for k, v in db.get_instance(instance_uuid).items()
            if k not in ("updated_at",)}
    return {
        "instance": inst,
        "usage": {h["name"]: (h["memory_used_mb"], h["vcpus_used"], h["disk_used_gb"])
                  for h in db.list_hosts()},
        "claims": db.list_claims(),
        "bindings": sorted((b["port_id"], b["host"], b["status"])
                           for b in db.list_port_bindings(instance_uuid)),
        "volume_connections": sorted((v["volume_id"], v["host"])
                                     for v in db.list_volume_connections(instance_uuid)),
        "guests": {h: [(g["uuid"], g["state"], g["persistent"]) for g in driver.guests(h)]
                   for h in hosts},
        "vifs": {h: [(v["port_id"], v["instance"]) for v in driver.vifs(h)] for h in hosts},
        "hv_volumes": {h: [(v["volume_id"], v["instance"])
                           for v in driver.volume_connections(h)] for h in hosts},
        "files": {h: sorted(f["path"] for f in driver.files(h)) for h in hosts},
    }


class Capture(capturing.CaptureListener):
    """Records task and retry state changes ("name.STATE") of one flow."""

    def __init__(self, engine):
        super().__init__(engine, capture_flow=False, capture_task=True,
                         capture_retry=False)

    @staticmethod
    def _format_capture(kind, state, details):
        return f"{details['task_name']}.{state}"

    def _named(self, state):
        suffix = "." + state
        return [v[:-len(suffix)] for v in self.values if v.endswith(suffix)]

    def executed(self):
        return self._named("SUCCESS")

    def reverted(self):
        return self._named("REVERTED")

    def failed(self):
        return self._named("FAILURE")


class CaptureFactory:
    """Collects the Capture of every flow an API instance runs."""

    def __init__(self):
        self.captures = []

    def __call__(self, engine):
        cap = Capture(engine)
        self.captures.append(cap)
        return cap

    @property
    def last(self):
        return self.captures[-1]


def fail_after_execute(monkeypatch, task_cls, message="injected failure"):
    """Make ``task_cls`` raise after its real execute did its work.

    Only for steps that make no hypervisor call (the fake driver injects
    faults into the others); the step's own revert must undo what it did.
    """
    real = task_cls.execute

    @functools.wraps(real)  # keeps the signature TaskFlow reads requirements from
    def execute(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise exc.InjectedFault(f"{message} in {self.NAME}")

    monkeypatch.setattr(task_cls, "execute", execute)


def wait_until(predicate, timeout=30.0, what="condition"):
    """Poll ``predicate`` until true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def conductor_config(conf, path, hosts=None, session_timeout=None):
    """Write the test's configuration for a conductor in another process
    (jobboard enabled; ``hosts``/``session_timeout`` override the
    jobboard's); returns the file's path."""
    path.write_text(f"""[DEFAULT]
state_path = {conf.state_path}
compute_driver = {conf.compute_driver}
[database]
connection = {conf.database.connection}
[fake_driver]
state_file = {conf.fake_driver.state_file}
time_scale = {conf.fake_driver.time_scale}
[persistence]
backend = {conf.persistence.backend}
[migration]
live_migration_poll_interval = {conf.migration.live_migration_poll_interval}
post_migration_retry_interval = 0
[jobboard]
enabled = true
hosts = {hosts or ",".join(conf.jobboard.hosts)}
path = {conf.jobboard.path}
session_timeout = {session_timeout or conf.jobboard.session_timeout}
stuck_after = 3600
""" + (f"[notifications]\nnotify_on_state_change = {conf.notifications.notify_on_state_change}\n"
       if conf.notifications.notify_on_state_change else ""))
    return str(path)


def fail_instead_of_execute(monkeypatch, task_cls, message="injected failure"):
    """Make ``task_cls`` raise before doing anything (a step whose single
    transaction could not commit)."""
    real = task_cls.execute

    @functools.wraps(real)
    def execute(self, *args, **kwargs):
        raise exc.InjectedFault(f"{message} in {self.NAME}")

    monkeypatch.setattr(task_cls, "execute", execute)
