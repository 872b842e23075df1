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
