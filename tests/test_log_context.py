"""Correlated logs (issue 6): every log line of a flow names its request and
its migration, whoever runs it; secrets are masked.  Real handlers, real
flows, the real CLI."""
import logging
import re

import pytest

from migrateflow import api, context

CALLER = context.make_context("alice", "ops", ["admin"], request_id="req-" + "2" * 32)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.addFilter(context.ContextFilter())
        self.setFormatter(logging.Formatter(context.LOG_FORMAT))
        self.records, self.lines = [], []

    def emit(self, record):
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def logs():
    handler = Collect()
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(saved)


def _flow_records(handler):
    """The records logged by the flow's steps and engine (not the API's)."""
    return [r for r in handler.records
            if r.name.startswith(("migrateflow.tasks", "migrateflow.engine",
                                  "migrateflow.flow_events"))]


@pytest.mark.parametrize("fault", [None, "pre_live_migration"])
def test_every_line_of_a_flow_names_request_and_migration(fault, logs, small_cloud, driver):
    uuid = small_cloud["instance"]["uuid"]
    if fault:
        driver.inject_fault(fault, instance=uuid, message="boom")
    mig = api.MigrationAPI(context=CALLER).live_migrate(uuid, "host-b")
    assert mig["status"] == ("failed" if fault else "completed")
    flow = _flow_records(logs)
    assert len(flow) >= 2, [r.getMessage() for r in logs.records]
    assert {(r.request_id, r.migration_id) for r in flow} == {(CALLER.request_id, mig["uuid"])}
    accepted = [r for r in logs.records if "live migration accepted" in r.getMessage()]
    assert [r.request_id for r in accepted] == [CALLER.request_id]
    # outside any request: the fields say so
    logging.getLogger("migrateflow.test").info("idle")
    assert logs.lines[-1].endswith("[request=- migration=-] idle")


def test_a_flow_in_a_thread_names_its_own_request(logs, small_cloud):
    client = api.MigrationAPI(context=CALLER)
    mig = client.live_migrate(small_cloud["instance"]["uuid"], "host-b", wait=False)
    assert client.wait(mig["uuid"], timeout=60)["status"] == "completed"
    flow = _flow_records(logs)
    assert flow and {(r.request_id, r.migration_id) for r in flow} == \
        {(CALLER.request_id, mig["uuid"])}


@pytest.mark.parametrize("message, args, secret", [
    ("connecting with password=%s", ("hunter2",), "hunter2"),
    ("url %s", ("rabbit://guest:s3cr3t@127.0.0.1:5672/",), "s3cr3t"),
    ('{"auth_token": "%s"}', ("gAAAAABtoken",), "gAAAAABtoken"),
])
def test_secrets_are_masked(message, args, secret, logs):
    logging.getLogger("migrateflow.test").warning(message, *args)
    assert secret not in logs.lines[-1]
    assert "***" in logs.lines[-1]


def test_secrets_in_a_traceback_are_masked(logs):
    try:
        raise ConnectionError("cannot reach rabbit://guest:s3cr3t@127.0.0.1:5672/ "
                              "with password=hunter2")
    except ConnectionError:
        logging.getLogger("migrateflow.test").exception("sending failed")
    line = logs.lines[-1]
    assert "Traceback" in line and "ConnectionError" in line
    assert "s3cr3t" not in line and "hunter2" not in line
    logging.getLogger("migrateflow.test").warning("here", stack_info=True)
    assert "Stack (most recent call last)" in logs.lines[-1]


def test_cli_lines_name_request_and_migration(run, small_cloud):
    uuid = small_cloud["instance"]["uuid"]
    code, out, err = run("-v", "live-migrate", uuid, "--host", "host-b")
    assert code == 0, err
    step_lines = [line for line in err.splitlines() if " step=" in line]
    assert step_lines, err
    for line in step_lines:
        assert re.search(r"\[request=req-[0-9a-f-]{36} migration=[0-9a-f-]{36}\]", line), line
    assert len({re.search(r"request=(\S+)", line).group(1) for line in step_lines}) == 1
