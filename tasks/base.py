"""What every migrateflow task shares: a stable name and run-time services.

Services (state database, hypervisor driver) are looked up from
configuration when a task runs, never stored in the task or the flow store,
so a flow rebuilt by another process finds them there too.
"""
import logging

from taskflow import task
from taskflow.types import failure as tf_failure

from migrateflow import drivers, lifecycle
from migrateflow.db import api as db_api

LOG = logging.getLogger(__name__)


class MigrationTask(task.Task):
    """A step of a migration flow; subclasses set NAME (stable forever:
    persisted atom details are matched to atoms by name)."""

    NAME = None

    def __init__(self, **kwargs):
        super().__init__(name=self.NAME, **kwargs)

    @property
    def db(self):
        return db_api.get_db()

    @property
    def driver(self):
        drv = drivers.get_driver()
        if drv.LOCAL_CALLS or not lifecycle.TURNS.holding():
            return drv
        return _TurnAway(drv)

    def instance(self, instance_id):
        return db_api.instance_to_driver(self.db.get_instance(instance_id))

    def log(self, level, message, migration_id=None, **fields):
        """Structured log line: message plus key=value fields."""
        extra = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        LOG.log(level, "%s step=%s migration=%s %s", message, self.NAME, migration_id,
                extra)


class _TurnAway:
    """A driver whose calls give this thread's turn away while they run
    (they wait on a hypervisor daemon: see ``lifecycle.Turns``)."""

    __slots__ = ("_driver",)

    def __init__(self, driver):
        self._driver = driver

    def __getattr__(self, name):
        found = getattr(self._driver, name)
        if not callable(found):
            return found

        def call(*args, **kwargs):
            with lifecycle.waiting():
                return found(*args, **kwargs)
        return call


def is_failure(result):
    return isinstance(result, tf_failure.Failure)


def failure_reason(flow_failures):
    """A readable reason from the failures that started a rollback."""
    if not flow_failures:
        return "rolled back"
    parts = []
    for atom_name, fail in flow_failures.items():
        parts.append(f"{atom_name}: {fail.exception_str or next(iter(fail), 'error')}")
    return "; ".join(parts)


def failure_types(flow_failures):
    """Exception type names (fully qualified, with bases) of the failures."""
    names = set()
    for fail in (flow_failures or {}).values():
        names.update(fail)  # a Failure iterates over its type names
    return names
