"""The app's migrations: they match its models, and the DDL they run is frozen history."""

from __future__ import annotations

import hashlib
import importlib
from io import StringIO

from django.core.management import call_command

from celery_exclusive.backends.sql import schema

#: SHA-256 of each frozen DDL text. A failure here means a frozen constant was edited: restore
#: it, and put the new schema in a new version (PG_DDL_V2, ...) with a migration of its own.
FROZEN_DDL = {
    "PG_DDL_V1": "8c80691f95e01a41ebb982e73fe5604cca7d8dc7dcb7c651cc258d9e9a7d6201",
    "SQLITE_DDL_V1": "2bcbf1fca11fc897d16a6f8e22ba514193e929d0210f707e9c05447e3d0e46c5",
}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_no_missing_migrations() -> None:
    out = StringIO()
    # Exits with SystemExit(1) when a model change has no migration.
    call_command("makemigrations", "celery_exclusive", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_the_frozen_ddl_is_unchanged() -> None:
    assert {name: _sha256(getattr(schema, name)) for name in FROZEN_DDL} == FROZEN_DDL


def test_migration_0002_runs_version_1_of_the_ddl() -> None:
    # Given the migration's own table names and the frozen version-1 DDL,
    migration = importlib.import_module(
        "celery_exclusive.contrib.django.migrations.0002_lease_tables"
    )
    names = {"lease": '"celery_exclusive_lease"', "fence": '"celery_exclusive_lease_fence"'}
    version_1 = {
        "postgresql": schema.PG_DDL_V1.format(**names),
        "sqlite": schema.SQLITE_DDL_V1.format(**names),
    }
    # then what it runs on each vendor is that DDL, whatever the store's current one is.
    runs: dict[str, str] = migration.DDL
    assert runs == version_1
