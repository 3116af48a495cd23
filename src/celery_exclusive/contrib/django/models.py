"""No tables: one unmanaged model gives the admin page its URL and its permissions.

``celery_exclusive.view_heldlease`` lets a staff user see the held leases;
``celery_exclusive.release_lease`` lets them force-release one (each release is written to
the admin's log as a deletion of a ``HeldLease``).
"""

from __future__ import annotations

from django.db import models


class HeldLease(models.Model):
    """A lease held in the configured store; rows come from the store, never from a table."""

    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = (("release_lease", "Can force-release a held lease"),)
        verbose_name = "held lease"
        verbose_name_plural = "held leases"

    def __str__(self) -> str:
        return "held lease"
