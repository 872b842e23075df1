"""The evacuation flow: rebuild an instance of a dead host elsewhere.

``build()`` is a pure module-level factory: no engine, no configuration
read, so any process can rebuild the flow to resume it.

    start-evacuation → check-source-down → fence-source
    → choose-destination: for each candidate (retry on the next host)
        check-candidate-host → claim-destination-resources
        → check-disk-on-destination
    → bind-ports-on-destination → connect-volumes-on-destination
    → rebuild-on-destination → record-instance-evacuated

A failure at any step reverts the finished steps in reverse order: the
destination guest destroyed, bindings and volume connections back on the
source, the claim dropped, the evacuation ``failed`` and the instance in
vm_state error on its source (Nova's failed evacuation).  The source's stale
copy is destroyed later, when the host comes back
(``EvacuationOps.host_started``), for the instances whose evacuation record
says so.
"""
from taskflow.patterns import linear_flow

from migrateflow.flows import common
from migrateflow.keys import StoreKey
from migrateflow.tasks import evacuate, live_checks

NAME = "evacuation"
CHOOSE_DESTINATION = "choose-destination"

#: what the caller must put in the store
REQUIRES = frozenset({
    StoreKey.MIGRATION_ID, StoreKey.INSTANCE_ID, StoreKey.SOURCE_HOST,
    StoreKey.CANDIDATES, StoreKey.POWER_ON,
})


def _choose_destination():
    return common.choose_destination(
        CHOOSE_DESTINATION,
        live_checks.CheckCandidateHost(provides=StoreKey.DEST_HOST),
        live_checks.ClaimDestinationResources(),
        evacuate.CheckDiskOnDestination(provides=StoreKey.ON_SHARED_STORAGE),
    )


def build():
    """Return the evacuation flow."""
    flow = linear_flow.Flow(NAME)
    flow.add(
        evacuate.StartEvacuation(),
        evacuate.CheckSourceDown(),
        evacuate.FenceSource(),
        _choose_destination(),
        evacuate.BindPortsOnDestination(provides=StoreKey.NETWORK_INFO),
        evacuate.ConnectVolumesOnDestination(provides=StoreKey.BLOCK_DEVICE_INFO),
        evacuate.RebuildOnDestination(),
        evacuate.RecordInstanceEvacuated(),
    )
    return flow
