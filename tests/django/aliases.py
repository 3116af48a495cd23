"""Database aliases a test adds to the running Django project, and takes away again."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connections

from celery_exclusive.contrib.django import conf


def add_alias(alias: str, config: dict[str, Any]) -> None:
    """Make ``alias`` a database of the project (``DATABASES[alias] = config``)."""
    # connections.settings is settings.DATABASES (the same dict) once Django has configured it.
    settings.DATABASES[alias] = config
    connections.settings[alias] = connections.configure_settings(
        {"default": dict(settings.DATABASES["default"]), alias: config}
    )[alias]


def remove_alias(alias: str) -> None:
    """Close ``alias``'s connection and forget it (and the store built from the settings)."""
    conf.reset()
    connections[alias].close()
    settings.DATABASES.pop(alias, None)
    connections.settings.pop(alias, None)
