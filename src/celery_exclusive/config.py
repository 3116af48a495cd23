"""Settings: one frozen dataclass, built by one adapter per entry point.

Explicit arguments win over settings, settings over the environment. The Celery adapter reads
``app.conf.exclusive_*`` (which Django's ``namespace="CELERY"`` fills from ``CELERY_EXCLUSIVE_*``
settings); the CLI reads ``CELERY_EXCLUSIVE_*`` environment variables. Nothing here touches the
network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["Settings"]

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
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "task_defaults":
                continue
            value = get(prefix + f.name)
            if value is not None:
                values[f.name] = _coerce(f.name, value)
        defaults = dict(get(prefix + "defaults") or {})
        from .options import TASK_OPTION_NAMES

        for name in TASK_OPTION_NAMES:
            value = get(prefix + name)
            if value is not None:
                defaults[name] = value
        return cls(**values, task_defaults=defaults)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``CELERY_EXCLUSIVE_*`` environment variables."""
        env = os.environ if environ is None else environ
        return cls.from_lookup(lambda name: env.get(name.upper()), prefix="CELERY_EXCLUSIVE_")

    def merged(self, **overrides: Any) -> Settings:
        """Return a copy with ``overrides`` (None values ignored) applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


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
