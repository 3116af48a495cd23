"""Settings: one frozen dataclass, built by one adapter per entry point.

Explicit arguments win over settings, settings over the environment. The Celery adapter reads
``app.conf.exclusive_*`` (which Django's ``namespace="CELERY"`` fills from ``CELERY_EXCLUSIVE_*``
settings); the CLI reads ``CELERY_EXCLUSIVE_*`` environment variables. Nothing here touches the
network.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["Settings", "check_lookup"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """Library-wide settings.

    ``url``: the store (``redis://...``, or a redis-py client); None means "find one" (the
    Celery adapter then tries the result backend and the broker). ``prefix``: the first part
    of every store key.
    ``enabled``: False turns every lock off (for test suites that want none).
    ``queue_ttl``: how long an enqueue lease waits for its task to start (plus any
    countdown/ETA), since nobody can renew a lease for a message sitting in a queue.
    ``task_defaults``: default options for every protected task (``ttl``, ``hold``, ...).
    """

    url: str | Any = None
    prefix: str = "exclusive"
    enabled: bool = True
    queue_ttl: float = 3600.0
    task_defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.url, (bytes, int, float)):
            raise ConfigurationError(f"exclusive url must be a str, not {type(self.url).__name__}")
        if not isinstance(self.prefix, str) or not self.prefix or "{" in self.prefix:
            raise ConfigurationError(
                f"exclusive prefix must be a non-empty str, not {self.prefix!r}"
            )
        q = self.queue_ttl
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q <= 0:
            raise ConfigurationError(f"exclusive queue_ttl must be seconds > 0, not {q!r}")
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
        """Build settings from ``CELERY_EXCLUSIVE_*`` environment variables."""
        env = os.environ if environ is None else environ
        return cls.from_lookup(lambda name: env.get(name.upper()), prefix="CELERY_EXCLUSIVE_")

    def merged(self, **overrides: Any) -> Settings:
        """Return a copy with ``overrides`` (None values ignored) applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


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
    if name == "enabled" and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(f"exclusive enabled must be true or false, not {value!r}")
    if name == "queue_ttl" and isinstance(value, str):
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigurationError(f"exclusive queue_ttl must be seconds, not {value!r}") from exc
    return value
