"""``manage.py exclusive list|show KEY|release KEY [--token T]|stats [--json]``.

The same commands as the ``celery-exclusive`` script, built from the same table
(:data:`celery_exclusive.cli.STORE_COMMANDS`), on the store of the Django settings. Exit code
1 when ``show`` finds the key free, ``release`` finds nothing to release, or ``stats`` cannot
reach the store.
"""

from __future__ import annotations

import io
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from celery_exclusive.cli import STORE_COMMANDS, add_store_commands
from celery_exclusive.contrib.django.conf import get_store
from celery_exclusive.exceptions import ExclusiveError


class Command(BaseCommand):
    help = "List, show, force-release or sum up celery-exclusive leases of the configured store."

    def add_arguments(self, parser: CommandParser) -> None:
        names = ",".join(command.name for command in STORE_COMMANDS)
        sub = parser.add_subparsers(dest="action", metavar=f"{{{names}}}")
        sub.required = True
        add_store_commands(sub)

    def handle(self, *args: Any, **options: Any) -> None:
        command = next(c for c in STORE_COMMANDS if c.name == options["action"])
        # The shared functions print() and json.dump() in pieces; Django's OutputWrapper
        # would end every piece with a newline, so collect the text first.
        out = io.StringIO()
        try:
            code = command.call(get_store(), options, out)
        except ExclusiveError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(out.getvalue(), ending="")
        if code:
            raise CommandError(command.failure_message(options), returncode=code)
