"""Flow persistence tables (TaskFlow logbooks, flow and atom details).

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _json():
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade():
    op.create_table(
        "tf_logbooks",
        sa.Column("uuid", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255)),
        sa.Column("updated_at", sa.DateTime),
        sa.Column("data", _json(), nullable=False))
    op.create_table(
        "tf_flowdetails",
        sa.Column("uuid", sa.String(64), primary_key=True),
        sa.Column("parent_uuid", sa.String(64),
                  sa.ForeignKey("tf_logbooks.uuid", ondelete="CASCADE"), index=True),
        sa.Column("name", sa.String(255)),
        sa.Column("state", sa.String(255), index=True),
        sa.Column("updated_at", sa.DateTime),
        sa.Column("data", _json(), nullable=False))
    op.create_table(
        "tf_atomdetails",
        sa.Column("uuid", sa.String(64), primary_key=True),
        sa.Column("parent_uuid", sa.String(64),
                  sa.ForeignKey("tf_flowdetails.uuid", ondelete="CASCADE"), index=True),
        sa.Column("name", sa.String(255)),
        sa.Column("atom_type", sa.String(32), nullable=False),
        sa.Column("state", sa.String(255)),
        sa.Column("updated_at", sa.DateTime),
        sa.Column("data", _json(), nullable=False))
