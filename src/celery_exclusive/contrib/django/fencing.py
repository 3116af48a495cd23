"""Fences in a Django model: refuse a write whose fence is below one already accepted.

Two ways (docs/fencing.md), on PostgreSQL and SQLite:

1. **A fence column** on the rows you write::

       class Account(models.Model):
           balance = models.IntegerField()
           fence = FenceField()                     # highest fence that wrote this row

           objects = FencedQuerySet.as_manager()

       Account.objects.filter(pk=42).fenced_update(lease.fence, balance=10)

   updates the rows whose fence is <= ``lease.fence`` (and sets it), or raises
   :class:`~celery_exclusive.StaleFence` and changes nothing when a matched row carries a
   higher one. ``fenced_update(queryset, fence, **values)`` is the same as a function.

2. **A fence table** for a resource that is not one row (the same SQL as
   :mod:`celery_exclusive.fencing`)::

       with transaction.atomic():
           accept_fence("sync:42", lease.fence)     # StaleFence if a higher fence was accepted
           ...                                      # your writes, in the same transaction

   The table is created by :func:`fence_table_operation` in one of your migrations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections, migrations, models, transaction

from ...exceptions import ConfigurationError, StaleFence
from ...fencing import (
    ACCEPT_FENCE_SQL,
    CREATE_FENCE_TABLE_SQL,
    CURRENT_FENCE_SQL,
    FENCE_TABLE,
    fence_sql,
    valid_fence,
    valid_resource,
)

__all__ = [
    "FenceField",
    "FencedQuerySet",
    "accept_fence",
    "create_fence_table",
    "fence_table_operation",
    "fenced_update",
]

M = TypeVar("M", bound=models.Model)

if TYPE_CHECKING:  # generic in django-stubs only; not subscriptable at run time
    _BigIntegerField = models.BigIntegerField[int, int]
else:
    _BigIntegerField = models.BigIntegerField


class FenceField(_BigIntegerField):
    """The highest fence that wrote this row (``bigint``, default 0, so any fence may write first).

    Set by :func:`fenced_update`; a model has at most one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default", 0)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        """Leave the default out of migrations when it is ours (0)."""
        name, path, args, kwargs = super().deconstruct()
        if kwargs.get("default") == 0:
            del kwargs["default"]
        return name, path, args, kwargs


def _fence_field(model: type[models.Model]) -> str:
    names = [f.name for f in model._meta.concrete_fields if isinstance(f, FenceField)]
    if len(names) != 1:
        raise ConfigurationError(
            f"fenced_update needs exactly one FenceField on {model.__name__}, found "
            f"{len(names)}{': ' + ', '.join(names) if names else ''}"
        )
    return names[0]


def fenced_update(queryset: models.QuerySet[M], fence: int, /, **values: Any) -> int:
    """Update the rows of ``queryset`` with ``values`` and ``fence``, unless one is fenced higher.

    All or nothing: every matched row has a fence <= ``fence`` (same fence again: allowed) and
    is updated, its :class:`FenceField` set to ``fence``; or :class:`StaleFence` is raised (with
    the highest fence found) and no row is changed. Returns the number of rows updated: 0 when
    none match (a missing row is not an error; the fence table covers resources that are not
    rows yet). One ``UPDATE ... WHERE fence <= %s``: a concurrent writer's row lock is waited
    for and the condition checked again on the row it committed. ``fence`` is positional
    (a model field may be called ``fence``; it is not a value to set: it is set for you).
    """
    fence = valid_fence(fence)
    name = _fence_field(queryset.model)
    if name in values:
        raise ConfigurationError(f"{name!r} is set to the fence by fenced_update; leave it out")
    with transaction.atomic(using=queryset.db):
        updated: int = queryset.filter(**{f"{name}__lte": fence}).update(**values, **{name: fence})
        # Rows left out were fenced higher when the UPDATE read them, and fences only rise:
        # raising here rolls back the rows that were updated.
        higher = queryset.filter(**{f"{name}__gt": fence}).aggregate(m=models.Max(name))["m"]
        if higher is not None:
            resource = queryset.model._meta.label
            raise StaleFence(resource=resource, fence=fence, current=higher)
    return updated


class FencedQuerySet(models.QuerySet[M]):
    """A QuerySet with :meth:`fenced_update`; ``objects = FencedQuerySet.as_manager()``."""

    def fenced_update(self, fence: int, /, **values: Any) -> int:
        """:func:`fenced_update` of this queryset."""
        updated: int = fenced_update(self, fence, **values)
        return updated


def _quoted(table: str, template: str, using: str) -> str:
    sql = fence_sql(template, table)
    if connections[using].vendor not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"the fence table works on PostgreSQL and SQLite, not {connections[using].vendor}"
        )
    return sql


def accept_fence(
    resource: str, fence: int, *, using: str = DEFAULT_DB_ALIAS, table: str = FENCE_TABLE
) -> None:
    """Record ``fence`` for ``resource`` in the current transaction, or raise StaleFence.

    Call it inside ``transaction.atomic(using=...)``, before the writes it guards; the
    resource's row stays locked until the transaction ends. Accepted when ``resource`` is new
    or its highest accepted fence is <= ``fence``; otherwise nothing is changed and
    :class:`StaleFence` is raised, which rolls the atomic block back.
    """
    resource = valid_resource(resource)
    fence = valid_fence(fence)
    if not transaction.get_connection(using).in_atomic_block:
        raise ConfigurationError(
            "accept_fence must run in the transaction of the write it guards: call it "
            "inside transaction.atomic()"
        )
    params = {"resource": resource, "fence": fence}
    with connections[using].cursor() as cursor:
        cursor.execute(_quoted(table, ACCEPT_FENCE_SQL, using), params)
        if cursor.rowcount == 1:
            return
        cursor.execute(_quoted(table, CURRENT_FENCE_SQL, using), params)
        row = cursor.fetchone()
    raise StaleFence(resource=resource, fence=fence, current=None if row is None else row[0])


def create_fence_table(*, using: str = DEFAULT_DB_ALIAS, table: str = FENCE_TABLE) -> None:
    """Create the fence table in database ``using`` if it does not exist."""
    with connections[using].cursor() as cursor:
        cursor.execute(_quoted(table, CREATE_FENCE_TABLE_SQL, using))


def fence_table_operation(table: str = FENCE_TABLE) -> migrations.RunSQL:
    """A migration operation that creates the fence table (and drops it when reversed).

    In one of your apps' migrations: ``operations = [fence_table_operation()]``.
    """
    return migrations.RunSQL(
        fence_sql(CREATE_FENCE_TABLE_SQL, table),
        reverse_sql=fence_sql("DROP TABLE IF EXISTS {table}", table),
    )
