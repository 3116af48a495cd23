"""The tables of the SQL lease store (``CELERY_EXCLUSIVE_DATABASE``), with the store's own DDL.

On PostgreSQL and SQLite this runs the statements of version 1 of the store's schema,
``PG_DDL_V1`` or ``SQLITE_DDL_V1`` of :mod:`celery_exclusive.backends.sql.schema` (chosen at
migrate time by the database's vendor): ``celery_exclusive_lease`` and
``celery_exclusive_lease_fence``, exactly as the store made them in that version, with
``CREATE TABLE IF NOT EXISTS`` (a no-op where a store made them already). On any other database
it does nothing: the leases cannot live there, and the system check ``celery_exclusive.E005``
says so if ``CELERY_EXCLUSIVE_DATABASE`` names it.

A migration is history: this one names the frozen, versioned DDL (never the store's current
one) and its own table names, so a later schema change adds a migration and leaves this one as
it ran (``tests/django/test_migrations.py`` records a hash of the frozen text).

It runs on every database ``migrate`` runs this app on, as any migration does; a router's
``allow_migrate(db, "celery_exclusive")`` keeps it off a database. ``sqlmigrate`` shows its SQL.
Unapplying it drops both tables, and every lease in them.
"""

from __future__ import annotations

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

from celery_exclusive.backends.sql.schema import PG_DDL_V1, SQLITE_DDL_V1

LEASE_TABLE = "celery_exclusive_lease"
FENCE_TABLE = "celery_exclusive_lease_fence"
TABLES = (LEASE_TABLE, FENCE_TABLE)

#: Version 1 of the DDL, for the tables above, by database vendor.
DDL = {
    vendor: ddl.format(lease=f'"{LEASE_TABLE}"', fence=f'"{FENCE_TABLE}"')
    for vendor, ddl in (("postgresql", PG_DDL_V1), ("sqlite", SQLITE_DDL_V1))
}


def _statements(script: str) -> list[str]:
    """The statements of a DDL script, without its comment lines."""
    statements = []
    for chunk in script.split(";"):
        lines = [line for line in chunk.splitlines() if not line.lstrip().startswith("--")]
        text = "\n".join(lines).strip()
        if text:
            statements.append(text)
    return statements


def create_lease_tables(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    script = DDL.get(schema_editor.connection.vendor)
    if script is None:
        return  # not a database the SQL store runs on (celery_exclusive.E005)
    for statement in _statements(script):
        schema_editor.execute(statement, params=None)


def drop_lease_tables(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    if schema_editor.connection.vendor not in DDL:
        return
    for table in TABLES:
        schema_editor.execute(f'DROP TABLE IF EXISTS "{table}"', params=None)


class CreateLeaseTables(migrations.RunPython):
    """``RunPython`` whose code only runs SQL through the schema editor: ``sqlmigrate`` shows it."""

    reduces_to_sql = True

    def describe(self) -> str:
        return "Create the lease tables of the SQL store (PostgreSQL and SQLite only)"


class Migration(migrations.Migration):
    dependencies = (("celery_exclusive", "0001_initial"),)

    operations = (CreateLeaseTables(create_lease_tables, drop_lease_tables),)
