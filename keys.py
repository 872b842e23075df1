"""Names of every value in a flow's store (the one place they are spelled).

Task ``execute``/``revert`` parameter names equal these values, so flows need
no rebinding.  Everything stored under these keys is plain JSON data: a flow
must be rebuildable and resumable by another process.
"""
import enum


class StoreKey(enum.StrEnum):
    #: uuid of the migration record this flow drives
    MIGRATION_ID = "migration_id"
    #: uuid of the instance being moved
    INSTANCE_ID = "instance_id"
    #: host the instance runs on when the request was accepted
    SOURCE_HOST = "source_host"
    #: destination hosts to try in order (the retry controller iterates them)
    CANDIDATES = "candidates"
    #: the destination under test in the current retry attempt
    CANDIDATE = "candidate"
    #: destination that passed every check (provided by the selection subflow)
    DEST_HOST = "dest_host"
    #: requested block migration (None: decide from shared storage)
    BLOCK_MIGRATION = "block_migration"
    #: result of the destination-side check (shared-storage probe, disk)
    DEST_CHECK_DATA = "dest_check_data"
    #: what the source check decided (shared storage, block migration)
    SOURCE_CHECK_DATA = "source_check_data"
    #: everything the hypervisor needs to move the guest: the source check's
    #: decisions as extended by pre_live_migration on the destination
    MIGRATE_DATA = "migrate_data"
    #: port binding / volume connection snapshot taken before the move
    NETWORK_INFO = "network_info"
    BLOCK_DEVICE_INFO = "block_device_info"
    #: cold migration / resize: flavors as {name, memory_mb, vcpus, disk_gb}
    OLD_FLAVOR = "old_flavor"
    NEW_FLAVOR = "new_flavor"
    #: whether source and destination share the instance path (probe file)
    SHARED_STORAGE = "shared_storage"
    #: what migrate_disk_and_power_off copied
    DISK_INFO = "disk_info"
    #: start the guest after the move (it was running before)
    POWER_ON = "power_on"
    #: evacuation: the instance's disk is already on the destination's storage
    ON_SHARED_STORAGE = "on_shared_storage"
    #: the guest's power state after a step that (re)started it
    POWER_STATE = "power_state"
    #: who asked: the request context as plain data (context.RequestContext
    #: .to_store), so a resumed flow keeps its caller and request id
    CONTEXT = "context"
