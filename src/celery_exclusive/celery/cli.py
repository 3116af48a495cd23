"""``celery -A proj exclusive ...``: the leases of an app's store, from Celery's own CLI.

The same commands as the ``celery-exclusive`` script, built as click commands from the same
table (:data:`celery_exclusive.cli.STORE_COMMANDS`), with the store found the way the tasks
find it (``exclusive_url``, else the Redis result backend or broker).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..cli import STORE_COMMANDS, StoreCommand
from ..exceptions import ExclusiveError
from .config import store_for

__all__ = ["exclusive"]


@click.group(name="exclusive")
def exclusive() -> None:
    """List, show and release celery-exclusive leases; sum them up (stats)."""


def _click_command(command: StoreCommand) -> click.Command:
    """The click command of a store command: its arguments as click parameters."""
    params: list[click.Parameter] = []
    for argument in command.arguments:
        if argument.positional:
            params.append(click.Argument([argument.dest]))
        else:
            params.append(
                click.Option(
                    [argument.name, argument.dest], is_flag=argument.flag, help=argument.help
                )
            )

    @click.pass_context
    def run(ctx: click.Context, /, **values: Any) -> None:
        try:
            code = command.call(store_for(ctx.obj.app), values, sys.stdout)
        except ExclusiveError as exc:
            raise click.ClickException(str(exc)) from exc
        ctx.exit(code)

    return click.Command(
        command.name,
        callback=run,
        params=params,
        help=command.help[0].upper() + command.help[1:] + ".",  # click's style: a sentence
    )


for _command in STORE_COMMANDS:
    exclusive.add_command(_click_command(_command))
