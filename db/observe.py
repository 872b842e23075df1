"""instance.update, as the state database sees it: every committed change of
an instance's vm_state or task_state, whoever made it (a flow's step, the
API's claim, a settle after a crash), with the states before and after.

SQLAlchemy's engine events do it in one place: before an UPDATE of the
instances table the matching rows are read (inside the same transaction),
after it they are read again, and the differences are sent once the
transaction committed and its connection went back to the pool (a rolled
back change is never announced).  Nothing is read when
``[notifications] notify_on_state_change`` is unset (the default).
"""
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.sql import dml

from migrateflow.db import models as m

_COLUMNS = ("uuid", "name", "project_id", "host", "vm_state", "task_state", "power_state")
_BEFORE, _PENDING, _COMMITTED = "mf_instances_before", "mf_instances_pending", \
    "mf_instances_committed"


def watch():
    """Announce the instance state changes committed through any engine
    (the listeners are the class's: every engine the state database makes,
    now or later; an UPDATE of another table costs one isinstance)."""
    if event.contains(sa.engine.Engine, "before_execute", _before):
        return
    event.listen(sa.engine.Engine, "begin", _rollback)  # nothing left of a lost one
    event.listen(sa.engine.Engine, "before_execute", _before)
    event.listen(sa.engine.Engine, "after_execute", _after)
    event.listen(sa.engine.Engine, "commit", _commit)
    event.listen(sa.engine.Engine, "rollback", _rollback)
    event.listen(sa.pool.Pool, "checkin", _checkin)


def announcing():
    """True when instance state changes are announced: then they must go
    through SQLAlchemy's engine, whose events are watched here."""
    from migrateflow import notifications  # notifications reads configuration
    return notifications.state_change_selected() is not None


def _states(conn, where, param_sets=({},)):
    """{uuid: states} of the instances ``where`` selects, with each of the
    statement's parameter sets (its WHERE may have bound parameters)."""
    cols = [m.instances.c[name] for name in _COLUMNS]
    query = sa.select(*cols)
    if where is not None:
        query = query.where(where)
    return {row.uuid: dict(row._mapping)
            for params in param_sets for row in conn.execute(query, params)}


def _before(conn, clauseelement, multiparams, params, execution_options):
    if conn.invalidated:
        return
    if isinstance(clauseelement, dml.Update) and clauseelement.table is m.instances \
            and announcing():
        param_sets = [params] if params else [p for p in multiparams if isinstance(p, dict)]
        conn.info[_BEFORE] = _states(conn, clauseelement.whereclause, param_sets or [{}])


def _after(conn, clauseelement, multiparams, params, execution_options, result):
    if conn.invalidated:
        return
    before = conn.info.pop(_BEFORE, None) if isinstance(clauseelement, dml.Update) else None
    if not before:
        return
    after = _states(conn, m.instances.c.uuid.in_(list(before)))
    pending = conn.info.setdefault(_PENDING, [])
    for uuid, old in before.items():
        new = after.get(uuid)
        if new is not None and (new["vm_state"], new["task_state"]) != \
                (old["vm_state"], old["task_state"]):
            pending.append((old, new))


def _commit(conn):
    if conn.invalidated:
        return
    pending = conn.info.pop(_PENDING, None)
    if pending:
        conn.info.setdefault(_COMMITTED, []).extend(pending)


def _rollback(conn):
    """Forget the changes of the transaction (a connection lost in it has
    no info left to read: its record is gone with it)."""
    if conn.invalidated:
        return
    conn.info.pop(_PENDING, None)
    conn.info.pop(_BEFORE, None)


def _checkin(dbapi_connection, connection_record):
    if connection_record is None:  # detached: nothing of ours on it
        return
    committed = connection_record.info.pop(_COMMITTED, None)
    connection_record.info.pop(_PENDING, None)
    if committed:
        from migrateflow import notifications
        for old, new in committed:
            notifications.instance_changed(old, new)
