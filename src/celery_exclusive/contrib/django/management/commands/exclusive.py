"""``manage.py exclusive list|show KEY|release KEY [--token T]|stats [--json]``.

The same listing, lookup, release and stats as the ``celery-exclusive`` command (the code is
shared), on the store of the Django settings. Exit code 1 when ``show`` finds the key free,
``release`` finds nothing to release, or ``stats`` cannot reach the store.
"""

from __future__ import annotations

import io
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from celery_exclusive.cli import list_leases, release_lease, show_lease, show_stats
from celery_exclusive.contrib.django.conf import get_store
from celery_exclusive.exceptions import ExclusiveError


class Command(BaseCommand):
    help = "List, show, force-release or sum up celery-exclusive leases of the configured store."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", metavar="{list,show,release,stats}")
        sub.required = True

        p = sub.add_parser("list", help="list held leases")
        p.add_argument("--match", help="only keys matching this glob")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

        p = sub.add_parser("show", help="show the holders of one key")
        p.add_argument("key")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

        p = sub.add_parser("release", help="force-release a key (its holder will see it lost)")
        p.add_argument("key")
        p.add_argument("--token", help="release only this holder")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

        p = sub.add_parser(
            "stats", help="leases per task, waiters, lost leases, store health and round trip"
        )
        p.add_argument("--match", help="only keys matching this glob")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        # The shared functions print() and json.dump() in pieces; Django's OutputWrapper
        # would end every piece with a newline, so collect the text first.
        out = io.StringIO()
        try:
            store = get_store()
            if action == "list":
                code = list_leases(store, match=options["match"], as_json=options["json"], out=out)
                failure = ""
            elif action == "stats":
                code = show_stats(store, match=options["match"], as_json=options["json"], out=out)
                failure = "the store could not be reached"
            elif action == "show":
                code = show_lease(store, options["key"], as_json=options["json"], out=out)
                failure = f"no lease is held on {options['key']!r}"
            else:
                code = release_lease(
                    store, options["key"], token=options["token"], as_json=options["json"], out=out
                )
                failure = f"nothing was held on {options['key']!r}"
        except ExclusiveError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(out.getvalue(), ending="")
        if code:
            raise CommandError(failure, returncode=code)
