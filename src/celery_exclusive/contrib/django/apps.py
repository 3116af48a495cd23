"""The Django app: ``INSTALLED_APPS = [..., "celery_exclusive.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class CeleryExclusiveConfig(AppConfig):
    """Registers the system checks and gives the Celery app the store of the Django settings."""

    name = "celery_exclusive.contrib.django"
    label = "celery_exclusive"
    verbose_name = "Celery exclusive"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import setting_changed
        from django.db.backends.signals import connection_created

        from . import checks  # noqa: F401 (registers the system checks)
        from .conf import bridge_settings, database_changed

        bridge_settings()
        setting_changed.connect(_on_setting_changed, dispatch_uid="celery_exclusive.reset")
        # The test runner renames the database after ready(): follow it (CELERY_EXCLUSIVE_DATABASE).
        connection_created.connect(database_changed, dispatch_uid="celery_exclusive.database")


def _on_setting_changed(setting: str, **kwargs: object) -> None:
    if setting.startswith("CELERY_") or setting in ("CACHES", "DATABASES"):
        from .conf import reset

        reset()
