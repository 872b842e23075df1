"""Instance and migration state vocabularies (as in the design seeds)."""
import enum


class VmState(enum.StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"
    RESIZED = "resized"
    ERROR = "error"


class TaskState(enum.StrEnum):
    MIGRATING = "migrating"
    RESIZE_PREP = "resize_prep"
    RESIZE_MIGRATING = "resize_migrating"
    RESIZE_MIGRATED = "resize_migrated"
    RESIZE_FINISH = "resize_finish"
    RESIZE_REVERTING = "resize_reverting"
    RESIZE_CONFIRMING = "resize_confirming"
    REBUILDING = "rebuilding"


class PowerState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    NOSTATE = "nostate"


class MigrationType(enum.StrEnum):
    LIVE = "live-migration"
    COLD = "migration"
    RESIZE = "resize"
    EVACUATION = "evacuation"


class LiveMigrationStatus(enum.StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ERROR = "error"


#: statuses after which nothing runs for a live migration any more
LIVE_TERMINAL = frozenset({
    LiveMigrationStatus.COMPLETED, LiveMigrationStatus.FAILED,
    LiveMigrationStatus.CANCELLED, LiveMigrationStatus.ERROR,
})


class MoveStatus(enum.StrEnum):
    """Statuses of cold migrations, resizes and evacuations (Nova's)."""
    #: resize / cold migration
    PRE_MIGRATING = "pre-migrating"
    MIGRATING = "migrating"
    POST_MIGRATING = "post-migrating"
    FINISHED = "finished"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    REVERTING = "reverting"
    REVERTED = "reverted"
    #: evacuation: accepted → pre-migrating → done, completed once the
    #: source host has destroyed its stale copy
    ACCEPTED = "accepted"
    DONE = "done"
    COMPLETED = "completed"
    FAILED = "failed"
    ERROR = "error"


#: a resize flow ends in ``finished`` (waiting for confirm or revert)
RESIZE_ENDED = frozenset({MoveStatus.FINISHED, MoveStatus.CONFIRMED, MoveStatus.REVERTED,
                          MoveStatus.ERROR})
#: an evacuation flow ends in ``done`` (the source has not cleaned up yet)
EVACUATION_ENDED = frozenset({MoveStatus.DONE, MoveStatus.COMPLETED, MoveStatus.FAILED,
                              MoveStatus.ERROR})
#: statuses in which no flow of the migration runs
FLOW_ENDED = LIVE_TERMINAL | RESIZE_ENDED | EVACUATION_ENDED
#: statuses in which a flow of the migration should be running
TRANSITIONAL = frozenset({
    LiveMigrationStatus.QUEUED, LiveMigrationStatus.PREPARING, LiveMigrationStatus.RUNNING,
    MoveStatus.PRE_MIGRATING, MoveStatus.MIGRATING, MoveStatus.POST_MIGRATING,
    MoveStatus.CONFIRMING, MoveStatus.REVERTING, MoveStatus.ACCEPTED,
})
