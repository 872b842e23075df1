"""The cold-migration / resize flow (one flow; the flavor change is
optional: a cold migration keeps the flavor).

``build()`` is a pure module-level factory (see flows/live_migration.py).

    start-resize → check-instance-for-resize
    → choose-resize-destination: for each candidate (at most three)
        check-resize-candidate → claim-resize-resources → check-shared-storage
    → migrate-disk-and-power-off → terminate-source-volume-connections
    → connect-destination-volumes → migrate-ports-to-destination
    → finish-migration → finish-resize

Statuses pre-migrating → migrating → post-migrating → finished (instance
RESIZED, waiting for confirm or revert).  The source keeps its stopped
guest until then, so a failure at any step reverts the finished steps in
reverse order back to the instance running (or stopped, as it was) on the
source with its old flavor, and the migration ``error`` with the reason.
"""
from taskflow.patterns import linear_flow

from migrateflow.flows import common
from migrateflow.keys import StoreKey
from migrateflow.tasks import resize_checks, resize_move

NAME = "resize"
CHOOSE_DESTINATION = "choose-resize-destination"

#: what the caller must put in the store
REQUIRES = frozenset({
    StoreKey.MIGRATION_ID, StoreKey.INSTANCE_ID, StoreKey.SOURCE_HOST,
    StoreKey.CANDIDATES, StoreKey.OLD_FLAVOR, StoreKey.NEW_FLAVOR, StoreKey.POWER_ON,
})

#: Nova's scheduler tries a resize on at most this many hosts
MAX_ATTEMPTS = 3


def _choose_destination():
    return common.choose_destination(
        CHOOSE_DESTINATION,
        resize_checks.CheckResizeCandidate(provides=StoreKey.DEST_HOST),
        resize_checks.ClaimResizeResources(),
        resize_checks.CheckSharedStorage(provides=StoreKey.SHARED_STORAGE),
    )


def build():
    """Return the cold-migration / resize flow."""
    flow = linear_flow.Flow(NAME)
    flow.add(
        resize_checks.StartResize(),
        resize_checks.CheckInstanceForResize(),
        _choose_destination(),
        resize_move.MigrateDiskAndPowerOff(provides=StoreKey.DISK_INFO),
        resize_move.TerminateSourceVolumeConnections(),
        resize_move.ConnectDestinationVolumes(provides=StoreKey.BLOCK_DEVICE_INFO),
        resize_move.MigratePortsToDestination(provides=StoreKey.NETWORK_INFO),
        resize_move.FinishMigration(provides=StoreKey.POWER_STATE),
        resize_move.FinishResize(),
    )
    return flow
