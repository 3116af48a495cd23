"""The app's migrations match its models: `makemigrations --check` finds nothing to write."""

from __future__ import annotations

from io import StringIO

from django.core.management import call_command


def test_no_missing_migrations() -> None:
    out = StringIO()
    # Exits with SystemExit(1) when a model change has no migration.
    call_command("makemigrations", "celery_exclusive", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
