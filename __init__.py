"""migrateflow: move virtual machines between compute hosts with durable TaskFlow flows."""

__version__ = "0.1.0"
