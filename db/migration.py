"""Schema migrations of the state database (alembic, run programmatically)."""
import os

import alembic.command
import alembic.config
import alembic.migration
import alembic.script

_SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


def target_metadata():
    """Every table the schema holds: state tables and flow persistence."""
    from migrateflow import persistence
    from migrateflow.db import models
    return [models.METADATA, persistence.METADATA]


def _config(connection):
    cfg = alembic.config.Config()
    cfg.set_main_option("script_location", _SCRIPTS)
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine, revision="head"):
    """Bring the database at ``engine`` to ``revision`` (idempotent)."""
    with engine.begin() as connection:
        alembic.command.upgrade(_config(connection), revision)


def current_revision(engine):
    with engine.connect() as connection:
        return alembic.migration.MigrationContext.configure(connection).get_current_revision()


def head_revision():
    script = alembic.script.ScriptDirectory(_SCRIPTS)
    return script.get_current_head()
