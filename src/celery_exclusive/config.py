"""Settings: one frozen dataclass, built by one adapter per entry point; the store they name.

Explicit arguments win over settings, settings over the environment. The adapters: the Celery
app's ``app.conf.exclusive_*`` (:mod:`celery_exclusive.celery.config`; Django's
``namespace="CELERY"`` fills it from ``CELERY_EXCLUSIVE_*`` settings), Django's settings
(:mod:`celery_exclusive.contrib.django.conf`), and ``CELERY_EXCLUSIVE_*`` environment variables
(:meth:`Settings.from_env`, for the ``celery-exclusive`` command, whose ``--url`` and
``--prefix`` win over them through :meth:`Settings.merged`).

When the settings name no store, a Celery app (and so a Django project) falls back on its
result backend, else its broker, when that is a Redis server: :func:`celery_fallback_url`, the
one place this rule lives. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .backends.base import DEFAULT_PREFIX
from .backends.url_options import key_prefix, query_items
from .exceptions import ConfigurationError
from .validate import seconds

__all__ = ["DEFAULT_PREFIX", "Settings", "celery_fallback_url", "check_lookup"]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Library-wide settings.

    ``url``: the store (``redis://...``, or a redis-py client); None means "find one" (the
    Celery adapter then tries the result backend and the broker: :func:`celery_fallback_url`).
    ``prefix``: the first part of every store key; None (not set) leaves it to the URL's
    ``?prefix=``, else :data:`DEFAULT_PREFIX` (see :meth:`store_options`).
    ``enabled``: False turns every lock off (for test suites that want none).
    ``queue_ttl``: how long an enqueue lease waits for its task to start (plus any
    countdown/ETA), since nobody can renew a lease for a message sitting in a queue.
    ``task_defaults``: default options for every protected task (``ttl``, ``hold``, ...).
    """

    url: str | Any = None
    prefix: str | None = None
    enabled: bool = True
    queue_ttl: float = 3600.0
    task_defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.url, (bytes, int, float)):
            raise ConfigurationError(f"exclusive url must be a str, not {type(self.url).__name__}")
        if self.prefix is not None:
            key_prefix("exclusive prefix", self.prefix)
        if not isinstance(self.enabled, bool):
            raise ConfigurationError(
                f"exclusive enabled must be true or false, not {self.enabled!r}"
            )
        seconds("exclusive queue_ttl", self.queue_ttl)
        if not isinstance(self.task_defaults, Mapping):
            raise ConfigurationError("exclusive task defaults must be a mapping")

    @classmethod
    def from_lookup(cls, get: Callable[[str], Any], *, prefix: str = "exclusive_") -> Settings:
        """Build settings from a lookup of ``<prefix><name>`` (e.g. ``app.conf.get``).

        Names: ``url``, ``prefix``, ``enabled``, ``queue_ttl``, and ``defaults`` (a dict of
        task options); each task option may also be given alone (``exclusive_ttl``,
        ``exclusive_on_conflict``...), which wins over the same name in ``defaults``.
        Numbers may be given as text (``"30"``; ``"none"`` for ``max_hold`` and
        ``max_retries``), as the environment gives them. Every value is checked here: a bad
        one raises :class:`ConfigurationError` naming each bad setting (see
        :func:`check_lookup`).
        """
        values, defaults, problems = _read(get, prefix)
        if problems:
            raise ConfigurationError("; ".join(problems))
        return cls(**values, task_defaults=defaults)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``CELERY_EXCLUSIVE_*`` environment variables (numbers as text)."""
        env = os.environ if environ is None else environ
        return cls.from_lookup(lambda name: env.get(name.upper()), prefix="CELERY_EXCLUSIVE_")

    def merged(self, **overrides: Any) -> Settings:
        """Return a copy with ``overrides`` applied: explicit arguments over these settings.

        A None override is "not given" and keeps the setting. The result is checked as any
        :class:`Settings` is.
        """
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def store_options(self, url: object) -> dict[str, Any]:
        """The keyword options of :func:`~celery_exclusive.connect` for the store at ``url``.

        A keyword option wins over the same option in the URL's query, so the prefix is
        passed when the user set it, left out when the URL names one (``?prefix=``), and
        otherwise is ``"exclusive"``: the prefix the integrations have always used, whatever
        the store's own default (SQL stores have none), so that the keys of a running
        project do not change. ``url`` may be a client object (no query: the default).
        """
        if self.prefix is not None:
            return {"prefix": self.prefix}
        if isinstance(url, str) and any(name == "prefix" for name, _ in query_items(url)):
            return {}
        return {"prefix": DEFAULT_PREFIX}


def celery_fallback_url(result_backend: object, broker_url: object) -> str | None:
    """Return the store a Celery app uses when its settings name none, or None.

    Its result backend, else its broker, when that URL names a store that may stand in for
    the lock store (Redis, per the registry of stores: not kombu's ``memory://``). Of a list
    of URLs (``sentinel://a;sentinel://b``, as Celery takes them) the first is used. Both the
    Celery app (``result_backend``, ``broker_url``) and a Django project
    (``CELERY_RESULT_BACKEND``, ``CELERY_BROKER_URL``) decide here.
    """
    from .backends.registry import STORE_TYPES

    schemes = tuple(f"{s}://" for kind in STORE_TYPES if kind.celery_fallback for s in kind.schemes)
    for value in (result_backend, broker_url):
        if isinstance(value, str) and value.lower().startswith(schemes):
            return value.split(";")[0]
    return None


def check_lookup(get: Callable[[str], Any], *, prefix: str = "exclusive_") -> list[str]:
    """Return one message per bad setting of the lookup (empty when all are good).

    Each message starts with the setting's name as the lookup spells it (``exclusive_ttl``,
    ``CELERY_EXCLUSIVE_TTL``). A task option is judged alone here: a pair that only a task
    can judge (``on_duplicate="replace"`` needs ``hold="queued"``, which the task may set)
    is checked per task, when a worker starts.
    """
    return _read(get, prefix)[2]


def _setting(prefix: str, name: str) -> str:
    """The name of a setting as the user wrote it (``exclusive_ttl``, ``CELERY_EXCLUSIVE_TTL``)."""
    return (prefix + name).upper() if prefix.isupper() else prefix + name


def _read(
    get: Callable[[str], Any], prefix: str
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Read and check every setting: (settings fields, task defaults, problems)."""
    from .options import TASK_OPTION_NAMES

    problems: list[str] = []
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "task_defaults":
            continue
        value = get(prefix + f.name)
        if value is None:
            continue
        try:
            values[f.name] = _coerce(f.name, value)
            Settings(**{f.name: values[f.name]})  # the field's own checks, alone
        except ConfigurationError as exc:
            problems.append(f"{_setting(prefix, f.name)}: {exc}")
    defaults: dict[str, Any] = {}
    sources: dict[str, str] = {}
    given = get(prefix + "defaults")
    if given is not None and not isinstance(given, Mapping):
        problems.append(
            f"{_setting(prefix, 'defaults')} must be a dict of task options, "
            f"not {type(given).__name__}"
        )
    elif given is not None:
        for name, value in given.items():
            defaults[name] = value
            sources[name] = f"{_setting(prefix, 'defaults')}[{name!r}]"
    for name in TASK_OPTION_NAMES:
        if any(f.name == name for f in fields(Settings)):
            continue  # ``queue_ttl``: a setting of its own, which the task option falls back to
        value = get(prefix + name)
        if value is not None:
            defaults[name] = value
            sources[name] = _setting(prefix, name)
    for name in list(defaults):
        try:
            defaults[name] = _coerce_option(name, defaults[name])
            _check_option(name, defaults[name])
        except ConfigurationError as exc:
            problems.append(f"{sources[name]}: {exc}")
    return values, defaults, problems


def _coerce_option(name: str, value: Any) -> Any:
    """Read a task option given as text (from the environment, or a str setting).

    Which options are numbers, and which may be None, is read from :class:`TaskOptions`'
    field types (``float``, ``int``, ``... | None``).
    """
    kind = _number_options().get(name)
    if not isinstance(value, str) or kind is None:
        return value
    number, nullable = kind
    text = value.strip()
    if nullable and text.lower() in ("none", "null"):
        return None
    try:
        return number(text)
    except ValueError:
        what = "a number of seconds" if number is float else "a whole number"
        raise ConfigurationError(f"exclusive option {name} must be {what}, not {value!r}") from None


@functools.cache
def _number_options() -> dict[str, tuple[type[float] | type[int], bool]]:
    """Task options that are numbers: name -> (float or int, whether None is allowed)."""
    from .options import TaskOptions

    kinds: dict[str, tuple[type[float] | type[int], bool]] = {}
    for f in fields(TaskOptions):
        spelled = str(f.type)  # annotations are strings here (from __future__ import annotations)
        base = spelled.removesuffix(" | None")
        if base in ("float", "int"):
            kinds[f.name] = (float if base == "float" else int, base != spelled)
    return kinds


def _check_option(name: str, value: Any) -> None:
    """Check one task option alone (unknown names, choices, numbers)."""
    from .options import TaskOptions

    layer = {name: value}
    if name == "on_duplicate":
        # 'replace' and 'keep_last' need a hold that a task may set: judge the value alone.
        layer = {"hold": "queued_and_running", **layer}
    TaskOptions.build(layer)


def _coerce(name: str, value: Any) -> Any:
    """Read a setting given as text (the environment's only kind), or ``enabled`` as 0/1."""
    if name == "enabled" and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(f"exclusive enabled must be true or false, not {value!r}")
    if name == "enabled" and type(value) is int and value in (0, 1):
        return bool(value)
    if name == "queue_ttl" and isinstance(value, str):
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigurationError(f"exclusive queue_ttl must be seconds, not {value!r}") from exc
    return value
