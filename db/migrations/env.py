"""Alembic environment: runs on the connection handed over by db.migration."""
from alembic import context

from migrateflow.db import migration

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=migration.target_metadata(),
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
