"""Turn a task call into a stable lease key.

A lease key names "one run of this task for these arguments". The producer (when a task is
queued) and the worker (when it runs) must compute the same key for the same call, so the
key depends only on the *meaning* of the call: arguments are bound through the task
function's signature (``f(1, b=2)``, ``f(a=1, b=2)`` and ``f(1, 2)`` are the same call, and
defaults are applied), and values are written as canonical JSON, which survives the JSON
round trip of a Celery message (tuples become lists, dict key order does not matter).

Key format (``<name>`` is the task name)::

    <name>                               no argument selected (``key=[]``)
    <name>:<arg>=<value>,<arg>=<value>   all arguments (``key=None``) or ``key=["arg", ...]``
    <name>:<formatted>                   ``key="{arg}-{other}"`` or a callable returning str
    <name>:<value>                       a callable returning anything else

``<value>`` is the argument's canonical JSON when that is short and made of safe characters
(``[A-Za-z0-9_.@+\\-"]``, at most 64 of them: integers, simple strings with their JSON
quotes, ``true``/``false``/``null``), as in ``myapp.sync:customer_id=42,slug="acme"``;
otherwise it is ``#`` followed by the first 32 hex digits of the SHA-256 of the canonical
text. A formatted key is kept when it is at most 128 characters of
``[A-Za-z0-9_.@+\\-:=,"]`` and is otherwise replaced by ``#<sha>`` in the same way.

When two calls share a key:

* ``key=None`` and ``key=[...]``: when every selected argument has the same canonical JSON
  (so ``1``, ``1.0``, ``True`` and ``"1"`` are four keys; a tuple and a list are one).
* ``key="<format>"``: when every field of the format gives the same text, ``format(value,
  spec)`` after any ``!r``/``!s`` conversion (so ``42`` and ``"42"`` share a key, and so do
  two objects whose ``__format__`` agrees). The format must have at least one field (a format
  without one, such as ``"customer_id"``, would key every call alike: it is refused, with
  ``key=["customer_id"]`` or ``key="{customer_id}"`` suggested; ``key=[]`` asks for one key
  for every call). With two or more fields, each field's text has ``%`` and every character
  of the separators (the literal text between two fields) percent-encoded (``%XX``, the
  UTF-8 bytes in upper-case hex), so ``"{a}-{b}"`` keys ``("1-2", "3")`` as ``1%2D2-3`` and
  ``("1", "2-3")`` as ``1-2%2D3``. Formats where that cannot make keys unambiguous are
  refused: two fields with nothing between them (``"{a}{b}"``), a separator that starts with
  ``%`` or an upper-case hex digit (``0-9``, ``A-F``), and a field whose format spec holds
  another field. A format with one field is never escaped: its text sits between a fixed
  prefix and suffix, so ``"{customer_id}"`` with 42 is ``<name>:42``.
* a callable: when it returns the same str, or values with the same canonical JSON.

Any key part that is not made of safe characters (an escaped one never is: ``%`` is not
safe) is shown as its hash, which changes nothing of the above.

When the whole key would be longer than ``max_length`` (200 by default), everything after
``<name>:`` is replaced by ``#`` and the 32-hex-digit SHA-256 of the unhashed text, so keys
stay short whatever the size of the arguments. Apart from the task name, a key only ever
holds printable ASCII characters, and never whitespace.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

from celery_exclusive.exceptions import ConfigurationError, KeyArgumentError

from .canonical import canonical, short_repr

__all__ = ["KeyBuilder", "canonical", "glob_escape", "make_key"]

_Piece: TypeAlias = tuple[str, str | None, str | None, str | None]
"""One piece of a parsed format string: literal text, field name, format spec, conversion."""

KeySpec: TypeAlias = Sequence[str] | str | Callable[..., object] | None
"""What selects the arguments that make up a key: see :class:`KeyBuilder`."""

_SAFE_PART = re.compile(r'[A-Za-z0-9_.@+\-"]{1,64}')
_SAFE_FORMATTED = re.compile(r'[A-Za-z0-9_.@+\-:=,"]{1,128}')
_FIELD_ROOT = re.compile(r"[^.\[]*")
_HASH_HEX = 32
# ":" + "#" + 32 hex digits: what a hashed key adds to the task name.
_HASHED_SUFFIX = 2 + _HASH_HEX

_ALL = "all"
_NONE = "none"
_NAMES = "names"
_FORMAT = "format"
_CALLABLE = "callable"


#: Characters an escape (``%XX``, upper-case hex) can start with or contain.
_ESCAPE_START = frozenset("%0123456789ABCDEF")


def _escape(text: str, chars: frozenset[str]) -> str:
    """Percent-encode (UTF-8, upper-case hex) every character of ``text`` found in ``chars``."""
    if not any(char in chars for char in text):
        return text
    return "".join(
        "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        if char in chars
        else char
        for char in text
    )


def _digest(text: str) -> str:
    """Return the first 32 hex digits of the SHA-256 of ``text`` (UTF-8)."""
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:_HASH_HEX]


def _check_name(name: object, max_length: object) -> str:
    """Validate a task name against ``max_length`` and return it."""
    if not isinstance(name, str):
        raise ConfigurationError(f"the task name must be a str, not {type(name).__name__}")
    if not name:
        raise ConfigurationError("the task name must not be empty")
    if any(char.isspace() or not char.isprintable() for char in name):
        raise ConfigurationError(
            f"task name {name!r} contains whitespace or control characters,"
            " which a lease key cannot hold"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ConfigurationError(f"max_length must be an int, not {type(max_length).__name__}")
    if len(name) > max_length - _HASHED_SUFFIX:
        raise ConfigurationError(
            f"task name {name!r} is {len(name)} characters long; with max_length={max_length}"
            f" it may be at most {max_length - _HASHED_SUFFIX} characters"
            f" (a hashed key adds {_HASHED_SUFFIX})"
        )
    return name


def _signature(name: str, func: Callable[..., object], skip_first: bool) -> inspect.Signature:
    """Return the signature that binds a call's arguments (without ``self`` if asked)."""
    if not callable(func):
        raise ConfigurationError(
            f"task {name!r}: func must be callable or None, not {type(func).__name__}"
        )
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"task {name!r}: cannot read the signature of {func!r}: {exc}"
        ) from exc
    if not skip_first:
        return sig
    params = list(sig.parameters.values())
    if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        # ``def run(*args)`` on a bound task: self arrives in args[0] at call time, but the
        # arguments given to the key builder never include it, so nothing is dropped.
        return sig
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigurationError(
            f"task {name!r}: skip_first=True but {func!r} has no positional first"
            f" parameter to skip (its signature is {sig})"
        )
    return sig.replace(parameters=params[1:])


def _field_roots(fmt: str) -> list[str]:
    """Return the root names of every replacement field in ``fmt`` (nested ones too).

    ``"{a.b[0]}"`` gives ``a``; an automatically numbered field ``"{}"`` gives ``""``.
    """
    roots: list[str] = []
    for _literal, field, spec, _conversion in string.Formatter().parse(fmt):
        if field is None:
            continue
        match = _FIELD_ROOT.match(field)
        roots.append(match.group() if match else field)
        if spec:
            roots.extend(_field_roots(spec))
    return roots


class KeyBuilder:
    """Compute the lease keys of one task; built once (at task decoration), used per call.

    ``name`` is the task name and the start of every key. ``func`` is the task's Python
    function and gives the signature that binds each call's arguments, so that every
    spelling of a call gives the same key and defaults are applied; ``skip_first=True``
    drops its first parameter (the ``self`` of a bound Celery task). With ``func=None``
    there is no signature: positional arguments are named ``arg0``, ``arg1``, ... and
    keyword arguments keep their names (sorted).

    ``key`` chooses what the key depends on:

    * ``None`` (default): every argument, in signature order.
    * an empty sequence: nothing; the key is the task name (one run at a time, at all).
    * a sequence of parameter names: those arguments, in the given order. With
      ``func=None`` they must be passed as keyword arguments.
    * a str: a format string whose fields are parameter names (``"{customer_id}-{region}"``);
      the values are formatted with ``format()``, so use scalar arguments (str, int). It
      needs at least one field, and a separator between any two fields that does not start
      with ``%`` or ``0-9A-F`` (see the module docs for when two calls share a key).
    * a callable: called with the bound arguments as keyword arguments (with ``func=None``:
      with the call's own arguments); it returns a str, used like a formatted string, or
      any value :func:`canonical` accepts.

    Names and format fields are checked against the signature here, so a typo raises
    :class:`~celery_exclusive.exceptions.ConfigurationError` at decoration time. When the
    function takes ``**kwargs``, names it does not declare are looked up in that dict at
    call time instead. Keys are at most ``max_length`` characters long.
    """

    __slots__ = (
        "_callable",
        "_escaped",
        "_format",
        "_kwargs_param",
        "_mode",
        "_names",
        "_parsed",
        "_sig",
        "max_length",
        "name",
    )

    def __init__(
        self,
        name: str,
        func: Callable[..., object] | None,
        key: KeySpec = None,
        *,
        skip_first: bool = False,
        max_length: int = 200,
    ) -> None:
        """Check the task name and key choice against the signature and prepare for calls."""
        self.name: str = _check_name(name, max_length)
        self.max_length: int = max_length
        self._sig: inspect.Signature | None = (
            None if func is None else _signature(name, func, skip_first)
        )
        self._kwargs_param: str | None = None
        if self._sig is not None:
            for param in self._sig.parameters.values():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    self._kwargs_param = param.name
        self._names: tuple[str, ...] = ()
        self._format: str | None = None
        self._parsed: tuple[_Piece, ...] = ()
        self._escaped: frozenset[str] = frozenset()
        self._callable: Callable[..., object] | None = None
        if key is None:
            self._mode = _ALL
        elif isinstance(key, str):
            try:
                roots = _field_roots(key)
            except ValueError as exc:
                raise ConfigurationError(
                    f"task {name!r}: key {key!r} is not a valid format string: {exc}"
                ) from exc
            self._check_fields(roots)
            self._parsed, self._escaped = self._check_format(key)
            self._format = key
            self._mode = _FORMAT
        elif isinstance(key, Sequence) and not isinstance(key, (bytes, bytearray)):
            self._names = self._check_names(tuple(key))
            self._mode = _NAMES if self._names else _NONE
        elif callable(key):
            self._callable = key
            self._mode = _CALLABLE
        else:
            raise ConfigurationError(
                f"task {name!r}: key must be None, a sequence of parameter names, a format"
                f" string or a callable, not {type(key).__name__}"
            )

    def __repr__(self) -> str:
        """Return a debugging representation."""
        if self._mode == _FORMAT:
            spec: object = self._format
        elif self._mode == _CALLABLE:
            spec = self._callable
        elif self._mode == _ALL:
            spec = None
        else:
            spec = list(self._names)
        return f"KeyBuilder({self.name!r}, key={spec!r}, max_length={self.max_length})"

    def _unknown(self, what: str, item: str) -> ConfigurationError:
        """Build the error for a name that is not a parameter of the task."""
        assert self._sig is not None
        have = ", ".join(self._sig.parameters) or "none"
        return ConfigurationError(
            f"task {self.name!r}: {what} {item!r} is not a parameter of the task"
            f" (its parameters are: {have})"
        )

    def _check_names(self, names: tuple[object, ...]) -> tuple[str, ...]:
        """Check the names of ``key=[...]`` and return them."""
        checked: list[str] = []
        for item in names:
            if not isinstance(item, str):
                raise ConfigurationError(
                    f"task {self.name!r}: key=[...] must hold parameter names (str),"
                    f" not {type(item).__name__} ({short_repr(item)})"
                )
            if item in checked:
                raise ConfigurationError(
                    f"task {self.name!r}: key=[...] names {item!r} more than once"
                )
            if self._sig is not None and item in self._sig.parameters:
                pass
            elif self._sig is not None and self._kwargs_param is None:
                raise self._unknown("key name", item)
            elif not item.isidentifier():
                raise ConfigurationError(
                    f"task {self.name!r}: key name {item!r} is not a valid argument name"
                )
            checked.append(item)
        return tuple(checked)

    def _check_fields(self, roots: list[str]) -> None:
        """Check the fields of a format-string key against the signature."""
        if self._sig is None:
            return
        for root in roots:
            if not root or root.isdigit():
                raise ConfigurationError(
                    f"task {self.name!r}: the key format string has a positional field"
                    f" ({{{root}}}); name a parameter instead, as in {{customer_id}}"
                )
            if root not in self._sig.parameters and self._kwargs_param is None:
                raise self._unknown("format field", root)

    def _check_format(self, fmt: str) -> tuple[tuple[_Piece, ...], frozenset[str]]:
        """Refuse a format that keys every call alike or that two calls could share.

        Return its parsed pieces and the characters to escape in each field's text.
        """
        parsed = tuple(string.Formatter().parse(fmt))
        fields = [piece for piece in parsed if piece[1] is not None]
        if not fields:
            root = fmt.strip()
            example = root if root.isidentifier() else "customer_id"
            raise ConfigurationError(
                f"task {self.name!r}: key {fmt!r} is a format string with no {{field}}, so every"
                f" call would get the same key; to key by an argument write key=[{example!r}]"
                f" or key={'{' + example + '}'!r} (one key for every call, on purpose, is"
                " key=[])"
            )
        for _literal, _field, spec, _conversion in fields:
            if spec and "{" in spec:
                raise ConfigurationError(
                    f"task {self.name!r}: key {fmt!r} has a nested field in the format spec"
                    f" {spec!r}; a key's format spec must be plain text"
                )
        if len(fields) == 1:
            # One field between a fixed prefix and suffix: its text is the key's middle.
            return parsed, frozenset()
        # The literal text between two fields (parse() splits it at ``{{`` and ``}}``).
        separators: list[str] = []
        text: str | None = None  # None until the first field
        for literal, field, _spec, _conversion in parsed:
            if text is not None:
                text += literal
            if field is not None:
                if text is not None:
                    separators.append(text)
                text = ""
        escaped = {"%"}
        for separator in separators:
            if not separator:
                raise ConfigurationError(
                    f"task {self.name!r}: key {fmt!r} has two fields with nothing between them,"
                    " so ('ab', 'c') and ('a', 'bc') would share a key; put a separator between"
                    " them, as in '{a}-{b}'"
                )
            if separator[0] in _ESCAPE_START:
                raise ConfigurationError(
                    f"task {self.name!r}: key {fmt!r} has a separator {separator!r} that starts"
                    f" with {separator[0]!r}, which could be part of an escape (%XX) in a field's"
                    " text; start each separator with another character, as in '-' or ':'"
                )
            escaped.update(separator)
        return parsed, frozenset(escaped)

    def _bind(self, args: Sequence[object], kwargs: Mapping[str, object]) -> dict[str, object]:
        """Return the call's arguments by parameter name, defaults applied."""
        assert self._sig is not None
        try:
            bound = self._sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise KeyArgumentError(
                f"task {self.name!r} was called with arguments that do not match its"
                f" signature {self._sig}: {exc}"
            ) from exc
        bound.apply_defaults()
        return dict(bound.arguments)

    def _fields(self, arguments: Mapping[str, object]) -> dict[str, object]:
        """Return the named arguments plus, under them, the entries of ``**kwargs``."""
        if self._kwargs_param is None:
            return dict(arguments)
        extra = arguments.get(self._kwargs_param)
        fields: dict[str, object] = dict(extra) if isinstance(extra, Mapping) else {}
        fields.update(arguments)
        return fields

    def _missing(self, item: str) -> KeyArgumentError:
        """Build the error for a key argument that the call did not pass."""
        how = " as a keyword argument (no signature is known)" if self._sig is None else ""
        return KeyArgumentError(
            f"task {self.name!r}: the key needs argument {item!r}, which the call did not"
            f" pass{how}",
            argument=item,
        )

    def _canonical(self, value: object, argument: str) -> str:
        """Return :func:`canonical` of ``value``, naming the task in any error."""
        try:
            return canonical(value, argument=argument)
        except KeyArgumentError as exc:
            raise KeyArgumentError(
                f"task {self.name!r}: {exc}", argument=exc.argument, value_type=exc.value_type
            ) from exc

    def _finish(self, shown: str, raw: str) -> str:
        """Join name and key text, hashing ``raw`` if the result is too long."""
        key = f"{self.name}:{shown}"
        if len(key) > self.max_length or not shown.isascii():
            key = f"{self.name}:#{_digest(raw)}"
        return key

    def _finish_text(self, text: str) -> str:
        """Finish a formatted (str) key part."""
        shown = text if _SAFE_FORMATTED.fullmatch(text) else f"#{_digest(text)}"
        return self._finish(shown, text)

    def _pairs(
        self, args: Sequence[object], kwargs: Mapping[str, object]
    ) -> list[tuple[str, object]]:
        """Return the (name, value) pairs a names or all-arguments key is made of."""
        if self._sig is not None:
            arguments = self._bind(args, kwargs)
            if self._mode == _ALL:
                return list(arguments.items())
            fields = self._fields(arguments)
            pairs: list[tuple[str, object]] = []
            for item in self._names:
                if item not in fields:
                    raise self._missing(item)
                pairs.append((item, fields[item]))
            return pairs
        if self._mode == _NAMES:
            for item in self._names:
                if item not in kwargs:
                    raise self._missing(item)
            return [(item, kwargs[item]) for item in self._names]
        pairs = [(f"arg{index}", value) for index, value in enumerate(args)]
        for item in sorted(kwargs):
            if not isinstance(item, str) or not item.isidentifier():
                raise KeyArgumentError(
                    f"task {self.name!r}: keyword argument name {short_repr(item)} is not"
                    " an identifier, so it cannot be part of a key",
                    argument=str(item),
                    value_type=type(item).__name__,
                )
            pairs.append((item, kwargs[item]))
        return pairs

    def _build_format(self, fmt: str, args: Sequence[object], kwargs: Mapping[str, object]) -> str:
        """Return the key of a format-string key choice."""
        if self._sig is None:
            positional: Sequence[object] = args
            fields: Mapping[str, object] = kwargs
        else:
            positional = ()
            fields = self._fields(self._bind(args, kwargs))
        formatter = string.Formatter()
        pieces: list[str] = []
        auto = 0
        try:
            for literal, field, spec, conversion in self._parsed:
                pieces.append(literal)
                if field is None:
                    continue
                if field == "":
                    field, auto = str(auto), auto + 1
                value, _ = formatter.get_field(field, positional, fields)
                value = formatter.convert_field(value, conversion)
                text = formatter.format_field(value, spec or "")
                pieces.append(_escape(text, self._escaped) if self._escaped else text)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
            raise KeyArgumentError(
                f"task {self.name!r}: cannot format key {fmt!r} with the call's arguments:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        return self._finish_text("".join(pieces))

    def _build_callable(
        self, func: Callable[..., object], args: Sequence[object], kwargs: Mapping[str, object]
    ) -> str:
        """Return the key of a callable key choice."""
        if self._sig is None:
            return self._finish_result(func(*args, **kwargs))
        return self._finish_result(func(**self._bind(args, kwargs)))

    def _finish_result(self, result: object) -> str:
        """Finish the key from what a key callable returned."""
        if isinstance(result, str):
            return self._finish_text(str.__str__(result))
        text = self._canonical(result, "<result of the key callable>")
        shown = text if _SAFE_PART.fullmatch(text) else f"#{_digest(text)}"
        return self._finish(shown, text)

    def build(self, args: Sequence[object] = (), kwargs: Mapping[str, object] | None = None) -> str:
        """Return the lease key for one call of the task.

        Raises :class:`~celery_exclusive.exceptions.KeyArgumentError` when the arguments do
        not fit the signature or a selected value has no canonical form.
        """
        if kwargs is None:
            kwargs = {}
        if self._mode == _NONE:
            return self.name
        if self._format is not None:
            return self._build_format(self._format, args, kwargs)
        if self._callable is not None:
            return self._build_callable(self._callable, args, kwargs)
        pairs = self._pairs(args, kwargs)
        if not pairs:
            return self.name
        shown_parts: list[str] = []
        raw_parts: list[str] = []
        for item, value in pairs:
            text = self._canonical(value, item)
            raw_parts.append(f"{item}={text}")
            safe = _SAFE_PART.fullmatch(text)
            shown_parts.append(f"{item}={text}" if safe else f"{item}=#{_digest(text)}")
        return self._finish(",".join(shown_parts), ",".join(raw_parts))


def make_key(
    name: str,
    func: Callable[..., object] | None,
    args: Sequence[object] = (),
    kwargs: Mapping[str, object] | None = None,
    key: KeySpec = None,
    *,
    skip_first: bool = False,
    max_length: int = 200,
) -> str:
    """Return the lease key of one call: ``KeyBuilder(...).build(args, kwargs)``.

    Convenient for one-off keys; a task should build its :class:`KeyBuilder` once.
    """
    builder = KeyBuilder(name, func, key, skip_first=skip_first, max_length=max_length)
    return builder.build(args, kwargs)


def glob_escape(text: str) -> str:
    """``text`` as a glob that matches it literally (for ``store.leases(match)``, Redis SCAN)."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)
