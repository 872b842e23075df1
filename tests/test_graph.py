"""The diagrams are drawn from the real flow: every atom shows up, the
PlantUML blocks balance, and the rollback they print is the order TaskFlow
really reverts in (checked by running the flow into a fault)."""
import re

import pytest
import taskflow.engines
from taskflow import states as tf_states
from taskflow.flow import Flow
from taskflow.types import notifier

from migrateflow import graph
from migrateflow.flows import live_migration
from migrateflow.keys import StoreKey
from migrateflow.states import MigrationType, TaskState
from migrateflow.tasks import live_migrate


def real_atoms(flow):
    """Atom names of a flow walked directly with TaskFlow's API."""
    names = [flow.retry.name] if flow.retry else []
    for node, _meta in flow.iter_nodes():
        names.extend(real_atoms(node) if isinstance(node, Flow) else [node.name])
    return names


@pytest.fixture(scope="module")
def diagrams():
    return {kind: graph.render("live-migration", kind) for kind in graph.KINDS}


def test_every_atom_appears_in_both_diagrams(diagrams):
    atoms = real_atoms(live_migration.build())
    assert len(atoms) == len(set(atoms)) > 10
    forward = {kind: text.split("Rollback")[0] for kind, text in diagrams.items()}
    for name in atoms:
        assert re.search(rf":{re.escape(name)}(;|\\n)", forward["activity"]), name
        assert re.search(rf" : {re.escape(name)}(:|$)", forward["sequence"], re.M), name


@pytest.mark.parametrize("kind", graph.KINDS)
def test_plantuml_blocks_balance(diagrams, kind):
    lines = [line.strip() for line in diagrams[kind].splitlines()]
    assert lines[0] == "@startuml" and lines[-1] == "@enduml"
    assert lines.count("@startuml") == lines.count("@enduml") == 1
    assert sum(line.startswith("note ") for line in lines) == lines.count("end note")
    if kind == "activity":
        assert sum(line.endswith("{") for line in lines) == lines.count("}")
        assert (sum(line.startswith("repeat :") for line in lines)
                == sum(line.startswith("repeat while") for line in lines) == 1)
        assert "next candidate on failure" in diagrams[kind]
    else:
        opened = sum(line.split(" ")[0] in ("group", "loop", "par", "alt") for line in lines)
        assert opened == lines.count("end") >= 2
        for participant in graph.PARTICIPANTS:
            assert f'"{participant}"' in diagrams[kind]


def test_reverts_by_notes_come_from_docstrings(diagrams):
    assert "Reverts by: deleting the destination's INACTIVE bindings" in diagrams["activity"]
    pre = graph.describe(live_migration.build())
    documented = [s for s in graph.steps(pre) if not s.is_retry]
    assert all(step.reverts_by for step in documented)


def test_printed_rollback_is_the_reverse_of_the_printed_steps(diagrams):
    text = diagrams["activity"]
    forward = re.findall(r"^\s*(?:repeat )?:([a-z-]+)(?:;|\\n)", text.split("Rollback")[0],
                         re.M)
    reverted = re.findall(r"^\s*:revert ([a-z-]+);", text, re.M)
    stop = forward.index(live_migrate.LiveMigrate.NAME)
    assert reverted == forward[:stop + 1][::-1]
    assert forward == real_atoms(live_migration.build())
    seq_reverted = re.findall(r"--> \w+ : revert ([a-z-]+)$", diagrams["sequence"], re.M)
    assert seq_reverted == reverted


def test_rollback_order_is_what_taskflow_reverts(small_cloud, db, driver):
    """Run the real flow with the copy failing on the source: the atoms
    TaskFlow reverts, in order, are the diagram's rollback."""
    inst = small_cloud["instance"]
    mig = db.start_migration(inst["uuid"], migration_type=MigrationType.LIVE,
                             task_state=TaskState.MIGRATING, source_host="host-a",
                             memory_total_mb=inst["memory_mb"])
    store = {StoreKey.MIGRATION_ID: mig["uuid"], StoreKey.INSTANCE_ID: inst["uuid"],
             StoreKey.SOURCE_HOST: "host-a", StoreKey.CANDIDATES: ["host-b", None],
             StoreKey.BLOCK_MIGRATION: None}
    driver.inject_fault("live_migration", host="host-a")
    engine = taskflow.engines.load(live_migration.build(), store=store, engine="serial")
    events = []
    engine.atom_notifier.register(notifier.Notifier.ANY, lambda state, details: events.append(
        (state, details.get("task_name") or details.get("retry_name"))))
    with pytest.raises(Exception, match="injected fault"):
        engine.run()
    ran = [name for state, name in events if state == tf_states.RUNNING]
    reverted = [name for state, name in events if state == tf_states.REVERTING]
    tree = graph.describe(live_migration.build())
    assert ran == graph.execution_order(tree)[:len(ran)]
    assert ran[-1] == live_migrate.LiveMigrate.NAME
    assert reverted == graph.rollback_order(tree, live_migrate.LiveMigrate.NAME) == ran[::-1]
    assert db.get_instance(inst["uuid"])["host"] == "host-a"


def test_registry_by_name():
    assert "live-migration" in graph.OPERATIONS
    with pytest.raises(KeyError, match="unknown operation"):
        graph.render("teleport")
    with pytest.raises(ValueError, match="unknown diagram kind"):
        graph.render("live-migration", "gantt")
    extra = graph.register(graph.Operation("just-checks", lambda: live_migration.build()))
    try:
        assert graph.render(extra.name).startswith("@startuml")
    finally:
        graph.OPERATIONS.pop(extra.name)


def test_participant_fallback():
    assert graph.participant_of("bind-destination-ports") == graph.NETWORK
    assert graph.participant_of("detach-some-volume") == graph.VOLUME
    assert graph.participant_of("think-hard") == graph.CONTROLLER
