"""Revert a finished resize / cold migration: reverting → reverted.

    start-revert-resize → check-revert-resize → revert-ports-to-source
    → revert-volumes-to-source → finish-revert-migration
    → complete-revert-resize

A failure before the hypervisors are touched leaves the resize
``finished``; a failure in finish-revert-migration leaves it ``error`` and
the instance ERROR (the guests' state is then for the operator, and no
confirm may destroy what could be the last copy).
"""
from taskflow.patterns import linear_flow

from migrateflow.keys import StoreKey
from migrateflow.tasks import resize_confirm

NAME = "revert-resize"

REQUIRES = frozenset({
    StoreKey.MIGRATION_ID, StoreKey.INSTANCE_ID, StoreKey.SOURCE_HOST, StoreKey.DEST_HOST,
    StoreKey.OLD_FLAVOR, StoreKey.POWER_ON,
})


def build():
    """Return the revert-resize flow."""
    flow = linear_flow.Flow(NAME)
    flow.add(
        resize_confirm.StartRevertResize(),
        resize_confirm.CheckRevertResize(),
        resize_confirm.RevertPortsToSource(),
        resize_confirm.RevertVolumesToSource(),
        resize_confirm.FinishRevertMigration(provides=StoreKey.POWER_STATE),
        resize_confirm.CompleteRevertResize(),
    )
    return flow
