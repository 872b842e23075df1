"""Confirm a finished resize / cold migration: confirming → confirmed.

    start-confirm-resize → check-shared-storage
    → confirm-migration-at-source → complete-confirm-resize

A failure before the source guest is destroyed leaves the resize
``finished`` (confirm again later); the source cleanup is idempotent, so a
confirm asked again after a later failure finds nothing left to destroy.
"""
from taskflow.patterns import linear_flow

from migrateflow.keys import StoreKey
from migrateflow.tasks import resize_checks, resize_confirm

NAME = "confirm-resize"

REQUIRES = frozenset({
    StoreKey.MIGRATION_ID, StoreKey.INSTANCE_ID, StoreKey.SOURCE_HOST, StoreKey.DEST_HOST,
})


def build():
    """Return the confirm-resize flow."""
    flow = linear_flow.Flow(NAME)
    flow.add(
        resize_confirm.StartConfirmResize(),
        resize_checks.CheckSharedStorage(provides=StoreKey.SHARED_STORAGE),
        resize_confirm.ConfirmMigrationAtSource(),
        resize_confirm.CompleteConfirmResize(),
    )
    return flow
