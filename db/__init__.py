"""The state database (``db.api``) and its schema (``db.migrations``)."""
from migrateflow.db import observe

observe.watch()  # instance.update notifications, see db/observe.py
