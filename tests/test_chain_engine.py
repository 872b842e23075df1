"""A new flow whose atoms form one chain runs without TaskFlow's state
machine (``serial_engine.Engine._run_chain``): each case runs the same
flow (tests/chain_flows.py) on our engine and on TaskFlow's own serial
engine, and asserts the same step calls, the same notifications in the
same order, the same stored end (flow state; each atom's state, intention,
result, failure, revert result) and the same exception; a flow left
detached or suspended is then finished by TaskFlow's engine alike."""
import contextlib

import pytest
import taskflow.engines
from taskflow import states as tf_states
from taskflow.engines.action_engine import compiler as tf_compiler
from taskflow.engines.action_engine import engine as tf_engine
from taskflow.patterns import graph_flow, unordered_flow
from taskflow.persistence import models as tf_models
from taskflow.persistence.backends import impl_memory
from taskflow.types import notifier as tf_notifier

import chain_flows
from migrateflow import lifecycle, serial_engine, serial_runtime

STORE = {"seed": 1, "candidates": ["h1", "h2", "h3"]}

#: case -> (what the steps do, what the run raises, whether the machine takes over)
CASES = {
    "success": ({}, None, False),
    "fails-before-the-retry": ({"fail": {"b": 1}}, RuntimeError, True),
    "retried-on-the-next-candidate": ({"fail": {"c": 1}}, None, True),
    "every-candidate-fails": ({"always_fail": {"d"}}, RuntimeError, True),
    "fails-after-the-retry": ({"fail": {"f": 1}}, RuntimeError, True),
    "a-revert-fails": ({"fail": {"f": 1}, "bad_revert": {"e"}}, RuntimeError, True),
    "detached": ({"detach": {"e"}}, lifecycle.Detach, False),
    "suspended": ({"suspend": {"d": None}}, None, False),
}


def _run(engine_of, plan, backend):
    """Run a new flow with ``engine_of(book)``: (calls, notifications,
    stored end, exception type, engine)."""
    chain_flows.reset()
    book = tf_models.LogBook("book")
    engine = engine_of(book, backend)
    chain_flows.PLAN.update({k: (set(v) if isinstance(v, set) else dict(v))
                             for k, v in plan.items()})
    if "suspend" in plan:
        chain_flows.PLAN["suspend"] = {step: engine for step in plan["suspend"]}
    seen = []
    engine.notifier.register(tf_notifier.Notifier.ANY,
                             lambda state, details: seen.append(("flow", state)))
    engine.atom_notifier.register(tf_notifier.Notifier.ANY, lambda state, details: seen.append(
        (details.get("task_name") or details.get("retry_name"), state)))
    raised = None
    try:
        engine.run()
    except BaseException as err:  # noqa: BLE001 - compared below
        raised = type(err)
    return chain_flows.PLAN["calls"], seen, _stored(backend, engine), raised, engine


def _stored(backend, engine):
    with contextlib.closing(backend.get_connection()) as conn:
        detail = conn.get_flow_details(engine.storage.flow_uuid)
    atoms = {}
    for ad in detail:
        if isinstance(ad, tf_models.RetryDetail):
            results = [(r, sorted(f)) for r, f in ad.results]
        else:
            results = ad.results
        atoms[ad.name] = (ad.state, ad.intention, results,
                          ad.failure and ad.failure.exception_str,
                          ad.revert_failure and ad.revert_failure.exception_str)
    return detail.state, atoms


def _ours(book, backend):
    return serial_engine.load(chain_flows.build, STORE, book, backend)


def _stock(book, backend):
    return taskflow.engines.load_from_factory(chain_flows.build, store=STORE, book=book,
                                              backend=backend, engine="serial")


def _finish(backend, engine):
    """Run what was left (detached or suspended) on TaskFlow's engine."""
    chain_flows.PLAN["calls"] = []
    with contextlib.closing(backend.get_connection()) as conn:
        detail = conn.get_flow_details(engine.storage.flow_uuid)
    taskflow.engines.load_from_detail(detail, backend=backend, engine="serial").run()
    return chain_flows.PLAN["calls"], _stored(backend, engine)


@pytest.fixture
def machine_runs(monkeypatch):
    """How many times TaskFlow's state machine ran, in ``count[0]``."""
    count = [0]
    real = tf_engine.ActionEngine.run_iter

    def counting(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tf_engine.ActionEngine, "run_iter", counting)
    return count


@pytest.mark.parametrize("case", list(CASES))
def test_chain_runs_as_taskflows_machine(case, machine_runs):
    plan, want_raised, machine_takes_over = CASES[case]
    stock_backend, our_backend = impl_memory.MemoryBackend(), impl_memory.MemoryBackend()
    want = _run(_stock, plan, stock_backend)
    machine_runs[0] = 0
    got = _run(_ours, plan, our_backend)
    assert got[3] is want[3] is want_raised
    assert got[0] == want[0], "step calls differ"
    assert got[1] == want[1], "notifications differ"
    assert got[2] == want[2], "stored end differs"
    assert machine_runs[0] == (1 if machine_takes_over else 0)
    if case == "success":
        assert got[2][0] == tf_states.SUCCESS
        assert all(atom[0] == tf_states.SUCCESS for atom in got[2][1].values())
    if case in ("detached", "suspended"):
        flow_state, atoms = got[2]
        assert flow_state == (tf_states.RUNNING if case == "detached" else tf_states.SUSPENDED)
        assert atoms["e" if case == "detached" else "f"][0] == (
            tf_states.RUNNING if case == "detached" else tf_states.PENDING)
        stock_rest, ours_rest = _finish(stock_backend, want[4]), _finish(our_backend, got[4])
        assert ours_rest == stock_rest
        assert ours_rest[1][0] == tf_states.SUCCESS


def test_only_a_chain_of_atoms_runs_without_the_machine():
    _flow, compilation, _key = serial_engine.compiled_flow(chain_flows.build, ())
    assert [atom.name for atom in serial_runtime.chain_of(compilation)] == [
        "a", "b", "choose-retry", "c", "d", "e", "f"]
    side_by_side = unordered_flow.Flow("u").add(chain_flows.Step(name="x"),
                                                chain_flows.Step(name="y"))
    x, y = chain_flows.Step(name="x"), chain_flows.Step(name="y")
    decided = graph_flow.Flow("g").add(x, y).link(x, y, decider=lambda history: True)
    for flow in (side_by_side, decided):
        assert serial_runtime.chain_of(tf_compiler.PatternCompiler(flow).compile()) is None


def test_runs_reusing_a_flow_share_its_scope_walkers():
    """Each argument lookup walks the atom's scopes: the walkers (which
    remember what they walked) are made once per compilation, and a second
    run of the thread's reused flow finds the same arguments."""
    backend = impl_memory.MemoryBackend()
    first, second = _run(_ours, {}, backend), _run(_ours, {}, backend)
    assert first[0] == second[0] and first[0], "the same calls, with the same arguments"
    assert second[2][0] == tf_states.SUCCESS
    runtimes = [result[4]._runtime for result in (first, second)]
    assert runtimes[0] is not runtimes[1]
    for name in ("a", "c", "f", "choose-retry"):
        assert runtimes[0].fetch_scopes_for(name) is runtimes[1].fetch_scopes_for(name)
    assert list(runtimes[1].fetch_scopes_for("f")) == [
        ["e", "d", "c", "choose-retry", "b", "a"]]
