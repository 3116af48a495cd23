"""``celery-exclusive``: list, show and release leases, sum them up (stats); run the demo.

The store commands (list, show, release, stats) are defined once, in :data:`STORE_COMMANDS`:
their names, help, arguments, the function that runs each, and what its failure means. This
script, ``celery -A proj exclusive`` (:mod:`celery_exclusive.celery.cli`, click) and
``manage.py exclusive`` (the Django command) are all built from that table.

The script's store comes from ``--url``, else ``$CELERY_EXCLUSIVE_URL``; its key prefix from
``--prefix``, else ``$CELERY_EXCLUSIVE_PREFIX``, else the URL's ``?prefix=``, else ``exclusive``
(:meth:`celery_exclusive.config.Settings.store_options`). Tables for people, ``--json``
for scripts. Exit codes: 0 ok, 1 a check or lookup failed (or the store is unreachable, for
``stats``), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from . import __version__, connect
from .backends.base import LeaseInfo
from .config import Settings
from .exceptions import ExclusiveError

__all__ = ["STORE_COMMANDS", "Argument", "StoreCommand", "add_store_commands", "main"]


def _store(args: argparse.Namespace) -> Any:
    settings = Settings.from_env().merged(url=args.url, prefix=args.prefix)
    if not settings.url:
        raise ExclusiveError("no store: pass --url redis://... or set CELERY_EXCLUSIVE_URL")
    return connect(settings.url, **settings.store_options(settings.url))


def _rows(infos: Sequence[LeaseInfo], *, tokens: bool = True) -> list[dict[str, Any]]:
    rows = []
    for info in infos:
        for holder in info.holders:
            meta = dict(holder.meta)
            rows.append(
                {
                    "key": info.key,
                    "fence": holder.fence,
                    "expires_in": round(holder.expires_in, 1),
                    "held_for": round(max(0.0, time.time() - holder.acquired_at), 1),
                    "task_id": meta.pop("task_id", ""),
                    "task_name": meta.pop("task_name", ""),
                    "worker": meta.pop("node", "")
                    or f"{meta.get('host', '')}:{meta.get('pid', '')}",
                    **({"token": holder.token} if tokens else {}),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    """Print rows as a table (rich when installed, plain text otherwise)."""
    if not rows:
        print("no leases held", file=out)
        return
    columns = list(rows[0])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
        print("  ".join(c.ljust(widths[c]) for c in columns), file=out)
        for r in rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in columns), file=out)
        return
    table = Table()
    for c in columns:
        table.add_column(c, overflow="fold")  # fold, never cut: keys must stay copyable
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    wide = None if getattr(out, "isatty", lambda: False)() else 200
    Console(file=out, width=wide).print(table)


def list_leases(store: Any, *, match: str | None, as_json: bool, out: TextIO) -> int:
    """Print every held lease (optionally matching a glob); return the exit code."""
    rows = _rows(list(store.leases(match)), tokens=as_json)
    if as_json:
        json.dump(rows, out, indent=2)
        print(file=out)
    else:
        print_table(rows, out)
    return 0


def show_lease(store: Any, key: str, *, as_json: bool, out: TextIO) -> int:
    """Print the holders of ``key``; exit code 1 when it is free."""
    holders = store.holders(key)
    if as_json:
        json.dump([h.as_dict() for h in holders], out, indent=2)
        print(file=out)
    elif holders:
        print_table(_rows([LeaseInfo(key, holders)]), out)  # with tokens: for --token
    else:
        print(f"{key!r} is free", file=out)
    return 0 if holders else 1


def release_lease(store: Any, key: str, *, token: str | None, as_json: bool, out: TextIO) -> int:
    """Force-release ``key`` (one holder by token, or all); exit code 1 when nothing was held."""
    removed = store.force_release(key, token)
    if as_json:
        json.dump({"key": key, "released": removed}, out)
        print(file=out)
    else:
        print(f"released {removed} hold(s) on {key!r}", file=out)
    return 0 if removed else 1


def show_stats(store: Any, *, match: str | None, as_json: bool, out: TextIO) -> int:
    """Print the store's health, round trip and leases per task; exit code 1 if unreachable."""
    from .stats import collect

    report = collect(store, match=match)
    if as_json:
        json.dump(report.as_dict(), out, indent=2)
        print(file=out)
        return 0 if report.healthy else 1
    print(f"store    {report.store}", file=out)
    if not report.healthy:
        print(f"health   UNREACHABLE: {report.error}", file=out)
        return 1
    print("health   ok", file=out)
    print(
        f"latency  {report.latency_ms:.2f} ms (median {report.latency_median_ms:.2f} ms)",
        file=out,
    )
    now = time.time()
    rows = [
        {
            "task": t.task,
            "held": t.held,
            "running": t.running,
            "queued": t.queued,
            "oldest_hold_s": t.oldest_hold if t.held else "",
            "keys_waited_on": "n/a" if t.keys_waited_on is None else t.keys_waited_on,
            "lost": "n/a" if t.lost is None else t.lost,
            "last_lost": _ago(now, t.last_lost_at),
        }
        for t in report.tasks
    ]
    print(file=out)
    print_table(rows, out)
    return 0


def _ago(now: float, at: float | None) -> str:
    if not at:
        return ""
    seconds = max(now - at, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .demo.celery_demo import run

    return run(args.redis, workers=args.workers, out=out)


def cmd_demo_leases(args: argparse.Namespace, out: TextIO) -> int:
    from .demo.leases import run

    return run(args.redis, workers=args.workers, duration=args.duration, ttl=args.ttl, out=out)


# -- the store commands, defined once -----------------------------------------------------


@dataclass(frozen=True)
class Argument:
    """One argument of a store command.

    ``name`` is ``key`` for a positional argument, ``--match`` for an option; ``dest`` is the
    keyword it is passed to the command's function as; ``flag``: an option without a value.
    """

    name: str
    help: str
    dest: str
    flag: bool = False

    @property
    def positional(self) -> bool:
        """Whether the argument is given without an option name."""
        return not self.name.startswith("-")


@dataclass(frozen=True)
class StoreCommand:
    """A command on a store: its name, help, arguments, function, and failure message.

    ``run(store, out=..., **arguments)`` prints to ``out`` and returns the exit code.
    ``failure`` says what a non-zero code means, formatted with the arguments (the Django
    command raises it as its ``CommandError``).
    """

    name: str
    help: str
    arguments: tuple[Argument, ...]
    run: Callable[..., int]
    failure: str

    def call(self, store: Any, values: Mapping[str, Any], out: TextIO) -> int:
        """Run the command on ``store``, its arguments taken from ``values``; return the code."""
        return self.run(store, out=out, **{a.dest: values.get(a.dest) for a in self.arguments})

    def failure_message(self, values: Mapping[str, Any]) -> str:
        """What the command's non-zero exit code means, for these arguments."""
        return self.failure.format(**{a.dest: values.get(a.dest) for a in self.arguments})


_KEY = Argument("key", "the lease's key", "key")
_MATCH = Argument("--match", "only keys matching this glob", "match")
_TOKEN = Argument("--token", "release only this holder", "token")
_JSON = Argument("--json", "print JSON for scripts", "as_json", flag=True)

#: The store commands of the script, ``celery -A proj exclusive`` and ``manage.py exclusive``.
STORE_COMMANDS: tuple[StoreCommand, ...] = (
    StoreCommand("list", "list held leases", (_MATCH, _JSON), list_leases, ""),
    StoreCommand(
        "show",
        "show the holders of one key",
        (_KEY, _JSON),
        show_lease,
        "no lease is held on {key!r}",
    ),
    StoreCommand(
        "release",
        "force-release a key (its holder will see it lost)",
        (_KEY, _TOKEN, _JSON),
        release_lease,
        "nothing was held on {key!r}",
    ),
    StoreCommand(
        "stats",
        "leases per task, waiters, lost leases, store health and round trip",
        (_MATCH, _JSON),
        show_stats,
        "the store could not be reached",
    ),
)


def add_store_commands(
    subparsers: Any, *, extra: Callable[[argparse.ArgumentParser], object] | None = None
) -> list[tuple[StoreCommand, argparse.ArgumentParser]]:
    """Add a parser per store command to argparse ``subparsers``; return each with its parser.

    ``extra(parser)`` adds the options an entry point adds to each (the script's ``--url``).
    """
    parsers = []
    for command in STORE_COMMANDS:
        parser = subparsers.add_parser(command.name, help=command.help)
        if extra is not None:
            extra(parser)
        for argument in command.arguments:
            if argument.positional:
                parser.add_argument(argument.dest, help=argument.help)
            elif argument.flag:
                parser.add_argument(
                    argument.name, dest=argument.dest, action="store_true", help=argument.help
                )
            else:
                parser.add_argument(argument.name, dest=argument.dest, help=argument.help)
        parsers.append((command, parser))
    return parsers


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="store URL (default: $CELERY_EXCLUSIVE_URL)")
    parser.add_argument(
        "--prefix",
        help="key prefix (default: $CELERY_EXCLUSIVE_PREFIX, else the URL's ?prefix=, "
        "else exclusive)",
    )


def _run_store_command(command: StoreCommand) -> Callable[[argparse.Namespace, TextIO], int]:
    def run(args: argparse.Namespace, out: TextIO) -> int:
        return command.call(_store(args), vars(args), out)

    return run


def build_parser() -> argparse.ArgumentParser:
    """Build the script's argument parser: the store commands and the demos."""
    parser = argparse.ArgumentParser(
        prog="celery-exclusive",
        description="List, show and release leases, sum them up per task; run the demo.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, p in add_store_commands(sub, extra=_store_options):
        p.set_defaults(func=_run_store_command(command))

    p = sub.add_parser(
        "demo", help="the Celery demo: real workers, duplicate bursts, a worker killed mid-task"
    )
    p.add_argument("--redis", metavar="URL", help="use this Redis instead of an embedded one")
    p.add_argument("--workers", type=int, default=2, help="Celery workers (2 processes each)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("demo-leases", help="the lease demo: processes contend for keys")
    p.add_argument("--redis", metavar="URL", help="use this Redis instead of an embedded one")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0, help="seconds of contention")
    p.add_argument("--ttl", type=float, default=2.0, help="lease ttl in seconds")
    p.set_defaults(func=cmd_demo_leases)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args, out or sys.stdout)
    except ExclusiveError as exc:
        print(f"celery-exclusive: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
