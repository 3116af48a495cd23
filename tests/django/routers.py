"""Routes the PostgreSQL database-cache table of the tests to the ``pg`` database alias."""

from __future__ import annotations

from typing import Any

#: Set by the ``postgres_cache`` fixture (a random name per session).
PG_CACHE_TABLE = ""


class PostgresCacheRouter:
    """Send the PostgreSQL cache table's model to ``pg``; everything else is not our business."""

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        table = getattr(model._meta, "db_table", "")
        return "pg" if PG_CACHE_TABLE and table == PG_CACHE_TABLE else None

    db_for_read = db_for_write

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        # Only the cache table goes to pg (createcachetable --database pg), no app tables.
        return app_label == "django_cache" if db == "pg" else None
