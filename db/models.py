"""State database schema (SQLAlchemy Core tables; alembic owns the DDL).

Usage counters on ``hosts`` are changed only by conditional UPDATEs in
``db.api`` so that concurrent claims can never overcommit a host.
"""
import sqlalchemy as sa

METADATA = sa.MetaData()


def _timestamps():
    return [
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    ]


hosts = sa.Table(
    "hosts", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("hypervisor_type", sa.String(64), nullable=False),
    sa.Column("hypervisor_version", sa.BigInteger, nullable=False),
    sa.Column("cpu_model", sa.String(64), nullable=False),
    sa.Column("cpu_features", sa.Text, nullable=False, default="[]"),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("vcpus_used", sa.Integer, nullable=False, default=0),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("memory_reserved_mb", sa.Integer, nullable=False, default=0),
    sa.Column("memory_used_mb", sa.Integer, nullable=False, default=0),
    sa.Column("disk_gb", sa.Integer, nullable=False),
    sa.Column("disk_used_gb", sa.Integer, nullable=False, default=0),
    sa.Column("shared_storage", sa.String(255), nullable=True),
    sa.Column("up", sa.Boolean, nullable=False, default=True),
    sa.Column("forced_down", sa.Boolean, nullable=False, default=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("disabled_reason", sa.String(255), nullable=True),
    *_timestamps(),
)

instances = sa.Table(
    "instances", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("project_id", sa.String(255), nullable=False, default=""),
    sa.Column("host", sa.String(255), nullable=True, index=True),
    sa.Column("vm_state", sa.String(32), nullable=False),
    sa.Column("task_state", sa.String(32), nullable=True),
    sa.Column("power_state", sa.String(32), nullable=False),
    sa.Column("flavor_name", sa.String(255), nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("disk_gb", sa.Integer, nullable=False),
    sa.Column("volume_backed", sa.Boolean, nullable=False, default=False),
    sa.Column("image_ref", sa.String(255), nullable=True),
    *_timestamps(),
)

block_devices = sa.Table(
    "block_devices", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("volume_id", sa.String(36), nullable=False, unique=True),
    sa.Column("device_name", sa.String(64), nullable=False),
    sa.Column("boot_index", sa.Integer, nullable=True),
    *_timestamps(),
)

#: one row per (volume, host) connection the volume service has exported
volume_connections = sa.Table(
    "volume_connections", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("volume_id", sa.String(36), nullable=False),
    sa.Column("instance_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("migration_uuid", sa.String(36), nullable=True),
    sa.Column("connection_info", sa.Text, nullable=False, default="{}"),
    sa.UniqueConstraint("volume_id", "host", name="uniq_volume_connections0volume0host"),
    *_timestamps(),
)

ports = sa.Table(
    "ports", METADATA,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("instance_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("network_id", sa.String(36), nullable=False),
    sa.Column("mac", sa.String(17), nullable=False),
    *_timestamps(),
)

#: a port has one ACTIVE binding; an INACTIVE one is prepared on a destination
port_bindings = sa.Table(
    "port_bindings", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("port_id", sa.String(36), nullable=False, index=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("migration_uuid", sa.String(36), nullable=True),
    sa.UniqueConstraint("port_id", "host", name="uniq_port_bindings0port0host"),
    *_timestamps(),
)

migrations = sa.Table(
    "migrations", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("instance_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("migration_type", sa.String(32), nullable=False),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("source_host", sa.String(255), nullable=False),
    sa.Column("dest_host", sa.String(255), nullable=True),
    sa.Column("requested_dest", sa.String(255), nullable=True),
    sa.Column("block_migration", sa.Boolean, nullable=True),
    sa.Column("memory_total_mb", sa.BigInteger, nullable=False, default=0),
    sa.Column("memory_processed_mb", sa.BigInteger, nullable=False, default=0),
    sa.Column("memory_remaining_mb", sa.BigInteger, nullable=False, default=0),
    sa.Column("disk_total_gb", sa.BigInteger, nullable=False, default=0),
    sa.Column("disk_processed_gb", sa.BigInteger, nullable=False, default=0),
    sa.Column("disk_remaining_gb", sa.BigInteger, nullable=False, default=0),
    sa.Column("dirty_rate_mbps", sa.Float, nullable=False, default=0.0),
    sa.Column("iteration", sa.Integer, nullable=False, default=0),
    sa.Column("downtime_ms", sa.Float, nullable=True),
    sa.Column("post_copy", sa.Boolean, nullable=False, default=False),
    sa.Column("current_step", sa.String(64), nullable=True),
    sa.Column("failed_step", sa.String(64), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("scheduler_notes", sa.Text, nullable=False, default="{}"),
    sa.Column("abort_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("force_complete_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("flow_uuid", sa.String(36), nullable=True),
    sa.Column("job_uuid", sa.String(36), nullable=True),
    sa.Column("owner", sa.String(255), nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    # resize / cold migration: flavors as JSON {name, memory_mb, vcpus, disk_gb}
    sa.Column("old_flavor", sa.Text, nullable=True),
    sa.Column("new_flavor", sa.Text, nullable=True),
    # the source host still counts the old flavor (until confirm or revert)
    sa.Column("source_held", sa.Boolean, nullable=False, default=False),
    # evacuation: the source host came back and destroyed its stale copy
    sa.Column("source_cleaned", sa.Boolean, nullable=False, default=False),
    *_timestamps(),
)

#: resources held on a destination while a migration is in flight
resource_claims = sa.Table(
    "resource_claims", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration_uuid", sa.String(36), nullable=False),
    sa.Column("instance_uuid", sa.String(36), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("disk_gb", sa.Integer, nullable=False),
    sa.UniqueConstraint("migration_uuid", "host", name="uniq_resource_claims0migration0host"),
    *_timestamps(),
)

flavors = sa.Table(
    "flavors", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("disk_gb", sa.Integer, nullable=False),
    *_timestamps(),
)

#: per-project hard limits; a missing row means unlimited
quota_limits = sa.Table(
    "quota_limits", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("project_id", sa.String(255), nullable=False),
    sa.Column("resource", sa.String(32), nullable=False),
    sa.Column("hard_limit", sa.Integer, nullable=False),
    sa.UniqueConstraint("project_id", "resource", name="uniq_quota_limits0project0resource"),
    *_timestamps(),
)

#: usage a resize holds beyond the instance's own flavor (the growth while
#: it moves; the old flavor's excess while it waits for confirm or revert)
quota_reservations = sa.Table(
    "quota_reservations", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration_uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("project_id", sa.String(255), nullable=False, index=True),
    sa.Column("cores", sa.Integer, nullable=False),
    sa.Column("ram_mb", sa.Integer, nullable=False),
    *_timestamps(),
)
