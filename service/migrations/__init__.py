"""Alembic scripts for the service's own tables (run through ``service.db.migrate``)."""
