"""The schema alembic builds is exactly the one the code uses."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from migrateflow.db import migration


def test_alembic_head_matches_the_models(db):
    assert migration.current_revision(db.engine) == migration.head_revision()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), migration.target_metadata())
    assert diff == []


def test_upgrade_is_idempotent(db):
    migration.upgrade(db.engine)
    assert migration.current_revision(db.engine) == migration.head_revision()
