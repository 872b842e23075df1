"""Migrations remember the jobboard job that runs their flow.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("migrations") as batch:
        batch.add_column(sa.Column("job_uuid", sa.String(36), nullable=True))
