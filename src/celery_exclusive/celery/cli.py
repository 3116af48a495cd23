"""``celery -A proj exclusive ...``: the leases of an app's store, from Celery's own CLI.

The same commands as the ``celery-exclusive`` script (one implementation), with the store
found the way the tasks find it (``exclusive_url``, else the Redis result backend or broker).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import cli
from ..exceptions import ExclusiveError
from .config import store_for

__all__ = ["exclusive"]


def _run(ctx: click.Context, command: Any, *args: Any, **kwargs: Any) -> None:
    try:
        code = command(store_for(ctx.obj.app), *args, out=sys.stdout, **kwargs)
    except ExclusiveError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.exit(code)


@click.group(name="exclusive")
def exclusive() -> None:
    """List, show and release celery-exclusive leases; sum them up (stats)."""


@exclusive.command(name="list")
@click.option("--match", help="Only keys matching this glob.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def list_command(ctx: click.Context, match: str | None, as_json: bool) -> None:
    """List held leases."""
    _run(ctx, cli.list_leases, match=match, as_json=as_json)


@exclusive.command(name="show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def show_command(ctx: click.Context, key: str, as_json: bool) -> None:
    """Show the holders of KEY."""
    _run(ctx, cli.show_lease, key, as_json=as_json)


@exclusive.command(name="release")
@click.argument("key")
@click.option("--token", help="Release only this holder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def release_command(ctx: click.Context, key: str, token: str | None, as_json: bool) -> None:
    """Force-release KEY (its holder will see its lease lost)."""
    _run(ctx, cli.release_lease, key, token=token, as_json=as_json)


@exclusive.command(name="stats")
@click.option("--match", help="Only keys matching this glob.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def stats_command(ctx: click.Context, match: str | None, as_json: bool) -> None:
    """Leases per task, waiters, lost leases, store health and round trip."""
    _run(ctx, cli.show_stats, match=match, as_json=as_json)
