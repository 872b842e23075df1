"""The idempotency checks every per-task test module runs on its flow's
steps.  ``run`` is the module's harness: ``execute(task)``,
``revert(task, result)`` and ``state(side_effects=True)`` (database and
hypervisors, with the fake's side-effect counters unless told not to)."""
from taskflow import flow as tf_flow


def tasks_of(flow):
    """The tasks of ``flow`` in the order it runs them, nested subflows
    included (retry controllers left out)."""
    for node, _ in flow.iter_nodes():
        if isinstance(node, tf_flow.Flow):
            yield from tasks_of(node)
        else:
            yield node


def execute_twice_is_once(run, task):
    """Executing twice leaves exactly the state (and result) of once."""
    first = run.execute(task)
    once = run.state()
    assert run.execute(task) == first
    assert run.state() == once


def revert_twice_is_once(run, task):
    """Reverting twice leaves exactly the state of reverting once."""
    result = run.execute(task)
    run.revert(task, result)
    once = run.state()
    run.revert(task, result)
    assert run.state() == once


def revert_undoes_execute(run, task, normalize=lambda state: state):
    """The revert restores the state before the execute (compared after
    ``normalize``, which drops what another step owns)."""
    before = run.state(side_effects=False)
    result = run.execute(task)
    assert run.state(side_effects=False) != before, "execute changed nothing"
    run.revert(task, result)
    assert normalize(run.state(side_effects=False)) == normalize(before)
