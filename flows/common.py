"""What the move flows share: choosing the destination among candidate
hosts, retrying on the next one when a check on the current one fails
(Nova's alternates; TaskFlow's retry controller)."""
from taskflow import retry
from taskflow.patterns import linear_flow

from migrateflow.keys import StoreKey


class ForEachCandidate(retry.ForEachBase):
    """Try the next candidate host when a check on the current one fails."""

    default_provides = StoreKey.CANDIDATE

    def execute(self, history, candidates):
        return self._get_next_value(candidates, history)

    def on_failure(self, history, candidates, *args, **kwargs):
        return self._on_failure(candidates, history)


def choose_destination(name, *tasks):
    """A subflow running ``tasks`` for each candidate until they all pass.

    revert_all: when no candidate is left the whole flow rolls back, not
    just this subflow.
    """
    subflow = linear_flow.Flow(
        name, retry=ForEachCandidate(name=name + "-retry", revert_all=True))
    subflow.add(*tasks)
    return subflow
