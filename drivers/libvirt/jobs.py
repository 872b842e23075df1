"""Live-migration jobs, pure parts: the flags and parameters of
migrateToURI3, and libvirt's job statistics as a MigrationJob."""
import libvirt

from migrateflow.drivers import base

MIB = float(1 << 20)
#: libvirt job types of a job that is still going
ACTIVE_JOB_TYPES = (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)


def flag_value(names):
    """The OR of libvirt flags given by name (VIR_MIGRATE_*)."""
    value = 0
    for name in names:
        value |= getattr(libvirt, name)
    return value


def migration_flags(settings, block_migration, params):
    """Flags of the job: the configured live (or block) migration flags,
    plus post-copy when permitted, else auto-converge when permitted (as
    Nova: post-copy makes auto-converge needless)."""
    names = settings.block_migration_flag if block_migration else settings.live_migration_flag
    flags = flag_value(names)
    if not block_migration:
        flags &= ~(libvirt.VIR_MIGRATE_NON_SHARED_DISK | libvirt.VIR_MIGRATE_NON_SHARED_INC)
    if params.get("post_copy"):
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    elif params.get("auto_converge"):
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    return flags


def migration_params(migration_uri, params, dest_xml=None, persist_xml=None,
                     listen_address=None):
    """The typed parameters of migrateToURI3."""
    typed = {}
    if migration_uri:
        typed[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri
    if listen_address:
        typed[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = listen_address
    if params.get("bandwidth_mbps"):
        typed[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(params["bandwidth_mbps"])
    if dest_xml:
        typed[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
    if persist_xml:
        typed[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = persist_xml
    return typed


def is_outgoing_migration(stats):
    """jobStats() describes a running outgoing migration."""
    if stats.get("type") not in ACTIVE_JOB_TYPES:
        return False
    operation = stats.get("operation")
    return operation in (None, libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT)


def job_view(stats, status, post_copy=False, error=None, memory_mb=0):
    """MigrationJob from libvirt's job statistics (bytes, pages/s, ms).

    ``memory_mb``: the guest's memory, the total while libvirt has no
    figures yet (the job is being set up)."""
    stats = stats or {}
    page = stats.get("memory_page_size") or 4096
    total = stats.get("memory_total")
    return base.MigrationJob(
        status=status,
        memory_total_mb=total / MIB if total else float(memory_mb),
        memory_processed_mb=stats.get("memory_processed", 0) / MIB,
        memory_remaining_mb=(stats["memory_remaining"] / MIB if "memory_remaining" in stats
                             else float(memory_mb if status == "running" else 0)),
        dirty_rate_mbps=stats.get("memory_dirty_rate", 0) * page / MIB,
        iteration=int(stats.get("memory_iteration", 0)),
        time_elapsed=stats.get("time_elapsed", 0) / 1000.0,
        downtime_ms=stats.get("downtime") if status == "completed" else None,
        post_copy=bool(post_copy),
        throttle_pct=int(stats.get("auto_converge_throttle", 0)),
        error=error,
        # what the copy moves now (the engine's escalation weighs the dirty rate
        # against it); None before QEMU measured it
        bandwidth_mbps=stats["memory_bps"] / MIB if stats.get("memory_bps") else None,
    )


def ended_status(err, aborted):
    """Status of a job whose migrateToURI3 raised ``err``."""
    if aborted or err.get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED:
        return "cancelled"
    return "failed"
