"""Resize, cold migration and evacuation: flavors, quotas, the flavors a
migration moves between, the source's held resources and the evacuation
cleanup mark.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _timestamps():
    return [sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False)]


def upgrade():
    with op.batch_alter_table("migrations") as batch:
        batch.add_column(sa.Column("old_flavor", sa.Text, nullable=True))
        batch.add_column(sa.Column("new_flavor", sa.Text, nullable=True))
        batch.add_column(sa.Column("source_held", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("source_cleaned", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
    op.create_table(
        "flavors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("disk_gb", sa.Integer, nullable=False),
        *_timestamps())
    op.create_table(
        "quota_limits",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.String(255), nullable=False),
        sa.Column("resource", sa.String(32), nullable=False),
        sa.Column("hard_limit", sa.Integer, nullable=False),
        sa.UniqueConstraint("project_id", "resource",
                            name="uniq_quota_limits0project0resource"),
        *_timestamps())
    op.create_table(
        "quota_reservations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration_uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("project_id", sa.String(255), nullable=False),
        sa.Column("cores", sa.Integer, nullable=False),
        sa.Column("ram_mb", sa.Integer, nullable=False),
        *_timestamps())
    op.create_index("ix_quota_reservations_project_id", "quota_reservations",
                    ["project_id"])
