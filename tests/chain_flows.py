"""A chain flow (linear flows and a retry controller on a subflow, as the
move flows are built) whose steps do what ``PLAN`` says: record each call,
fail a number of times, detach, suspend their engine, fail their revert.
Importable by name (``chain_flows.build``), so an engine can be loaded
from the factory and resumed from its flow detail."""
from taskflow import task
from taskflow.patterns import linear_flow

from migrateflow import lifecycle
from migrateflow.flows import common

#: what the steps do: calls (list of (kind, step, value)); fail: step -> how
#: many more times it raises; always_fail: steps that always raise; detach:
#: steps that raise lifecycle.Detach once; suspend: step -> the engine it
#: suspends once; bad_revert: steps whose revert raises
PLAN = {}


def reset():
    PLAN.clear()
    PLAN.update(calls=[], fail={}, always_fail=set(), detach=set(), suspend={},
                bad_revert=set())


class Step(task.Task):
    def execute(self, *args, **kwargs):
        value = (self.name, sorted(kwargs.items()))
        PLAN["calls"].append(("execute", self.name, value))
        if self.name in PLAN["detach"]:
            PLAN["detach"].discard(self.name)
            raise lifecycle.Detach()
        engine = PLAN["suspend"].pop(self.name, None)
        if engine is not None:
            engine.suspend()
        if self.name in PLAN["always_fail"] or PLAN["fail"].get(self.name, 0) > 0:
            PLAN["fail"][self.name] = PLAN["fail"].get(self.name, 0) - 1
            raise RuntimeError(f"{self.name} failed")
        return f"{self.name}-done"

    def revert(self, *args, **kwargs):
        PLAN["calls"].append(("revert", self.name, None))
        if self.name in PLAN["bad_revert"]:
            raise RuntimeError(f"{self.name} revert failed")


def build():
    """a → b → choose (for each candidate: c → d) → e → f(e's result)."""
    return linear_flow.Flow("chain").add(
        Step(name="a", requires=["seed"]),
        Step(name="b"),
        common.choose_destination("choose", Step(name="c", requires=["candidate"]),
                                  Step(name="d")),
        Step(name="e", provides="e_out"),
        Step(name="f", requires=["e_out"]),
    )
