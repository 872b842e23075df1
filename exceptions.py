"""Errors raised to callers.  Every message names the thing that is wrong."""


class MigrateflowError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class InvalidRequest(MigrateflowError):
    """The request is malformed or not allowed; nothing was changed."""


class NotFound(InvalidRequest):
    pass


class InstanceNotFound(NotFound):
    def __init__(self, instance_id):
        super().__init__(f"instance {instance_id!r} not found")


class HostNotFound(NotFound):
    def __init__(self, host):
        super().__init__(f"host {host!r} not found")


class MigrationNotFound(NotFound):
    def __init__(self, migration_id):
        super().__init__(f"migration {migration_id!r} not found")


class FlavorNotFound(NotFound):
    def __init__(self, flavor):
        super().__init__(f"flavor {flavor!r} not found")


class QuotaExceeded(InvalidRequest):
    """The project's quota does not allow the request."""


class Forbidden(InvalidRequest):
    """The policy does not allow the caller to do this; nothing was changed."""


class InvalidHostName(InvalidRequest):
    pass


class InstanceInvalidState(InvalidRequest):
    pass


class InstanceBusy(InstanceInvalidState):
    """Another operation holds the instance (task_state compare-and-swap lost)."""


class HostUnavailable(InvalidRequest):
    """The host is down or disabled."""


class MigrationPreCheckError(InvalidRequest):
    """A destination or source check refused the move."""


class InvalidSharedStorage(MigrationPreCheckError):
    pass


class InvalidLocalStorage(MigrationPreCheckError):
    pass


class InsufficientResources(MigrationPreCheckError):
    pass


class HypervisorMismatch(MigrationPreCheckError):
    pass


class CPUIncompatible(MigrationPreCheckError):
    pass


class NoValidHost(MigrationPreCheckError):
    pass


class MigrationAborted(MigrateflowError):
    """The operator aborted the migration; the rollback ran."""


class MigrationTimeout(MigrateflowError):
    """The completion timeout elapsed and the timeout action was abort."""


class InvalidMigrationState(InvalidRequest):
    """The migration cannot do what was asked in its current status."""


class FlowNotStarted(MigrateflowError):
    """The flow could not be persisted or posted: nothing of it ran."""


class DriverError(MigrateflowError):
    """A hypervisor, network or volume operation failed."""


class InjectedFault(DriverError):
    """A fault injected into the fake driver by a test or the demo."""
