"""The live-migration flow (DESIGN.md's seed order).

``build()`` is a pure module-level factory: no engine, no configuration
read, so any process can rebuild the flow to resume it
(``engines.load_from_factory``).

    start-live-migration → check-instance-and-source
    → choose-destination: for each candidate (retry on the next host)
        check-candidate-host → claim-destination-resources
        → check-can-live-migrate-destination → check-can-live-migrate-source
        → cleanup-destination-check
    → bind-destination-ports → connect-destination-volumes → pre-live-migration
    → live-migration
    → record-instance-on-destination → activate-destination-ports
    → post-live-migration-at-source → terminate-source-volume-connections
    → post-live-migration-at-destination → cleanup-source
    → complete-live-migration

A failure before the guest runs on the destination reverts the finished
steps in reverse order: that is the rollback (Nova's
_rollback_live_migration + rollback_live_migration_at_destination).
"""
from taskflow.patterns import linear_flow

from migrateflow.flows import common
from migrateflow.keys import StoreKey
from migrateflow.tasks import live_checks, live_migrate, live_post, live_prepare

NAME = "live-migration"
CHOOSE_DESTINATION = "choose-destination"

#: what the caller must put in the store
REQUIRES = frozenset({
    StoreKey.MIGRATION_ID, StoreKey.INSTANCE_ID, StoreKey.SOURCE_HOST,
    StoreKey.CANDIDATES, StoreKey.BLOCK_MIGRATION,
})


def _choose_destination():
    return common.choose_destination(
        CHOOSE_DESTINATION,
        live_checks.CheckCandidateHost(provides=StoreKey.DEST_HOST),
        live_checks.ClaimDestinationResources(),
        live_checks.CheckDestination(provides=StoreKey.DEST_CHECK_DATA),
        live_checks.CheckSource(provides=StoreKey.SOURCE_CHECK_DATA),
        live_checks.CleanupDestinationCheck(),
    )


def build():
    """Return the live-migration flow."""
    flow = linear_flow.Flow(NAME)
    flow.add(
        live_checks.StartLiveMigration(),
        live_checks.CheckInstanceAndSource(),
        _choose_destination(),
        live_prepare.BindDestinationPorts(provides=StoreKey.NETWORK_INFO),
        live_prepare.ConnectDestinationVolumes(provides=StoreKey.BLOCK_DEVICE_INFO),
        live_prepare.PreLiveMigration(provides=StoreKey.MIGRATE_DATA),
        live_migrate.LiveMigrate(),
        live_post.RecordInstanceOnDestination(),
        live_post.ActivateDestinationPorts(),
        live_post.PostLiveMigrationAtSource(),
        live_post.TerminateSourceVolumeConnections(),
        live_post.PostLiveMigrationAtDestination(),
        live_post.CleanupSource(),
        live_post.CompleteLiveMigration(),
    )
    return flow
