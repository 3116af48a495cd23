"""Tests for celery_exclusive.keys: canonical JSON and lease keys."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import math
import re
import uuid
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_exclusive.exceptions import ConfigurationError, KeyArgumentError
from celery_exclusive.keys import KeyBuilder, canonical, make_key

HASHED_PART = re.compile(r"#[0-9a-f]{32}")


# -- Helpers and strategies ----------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=15,
)


def tagged(value: object) -> object:
    """Return a type-aware, hashable form of JSON-like data (1, 1.0 and True all differ)."""
    if value is None or isinstance(value, (bool, str)):
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value.hex())  # tells -0.0 from 0.0, as JSON does
    if isinstance(value, (list, tuple)):
        return ("list", tuple(tagged(item) for item in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((key, tagged(item)) for key, item in value.items())))
    raise AssertionError(f"not JSON-like: {value!r}")


def is_printable_key(key: str) -> bool:
    """Return whether a key is printable ASCII without whitespace."""
    return key.isascii() and key.isprintable() and not any(char.isspace() for char in key)


def customer(customer_id: object) -> None:
    """Task function with one parameter."""


def two(a: object, b: object = 2) -> None:
    """Task function with a default."""


def four(a: object, b: object, c: object = 3, *, d: object = 4) -> None:
    """Task function with positional, default and keyword-only parameters."""


def variadic(a: object, *args: object, **kwargs: object) -> None:
    """Task function with *args and **kwargs."""


def bound(self: object, customer_id: object, region: object = "eu") -> None:
    """A bound Celery task's function."""


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    LOW = 1


class Name(str, enum.Enum):
    ACME = "acme"


# -- The examples from the specification ---------------------------------------------------


def test_named_key_example() -> None:
    key = make_key("myapp.sync_customer", customer, (42,), key=["customer_id"])
    assert key == "myapp.sync_customer:customer_id=42"


def test_empty_key_is_the_task_name() -> None:
    assert make_key("t", customer, (), key=[]) == "t"
    assert make_key("t", customer, (42,), key=()) == "t"
    # With key=[] the arguments are not even looked at.
    assert make_key("t", customer, ({1, 2},), key=[]) == "t"


def test_spellings_of_a_call_give_one_key() -> None:
    keys = {
        make_key("t", two, (1,), {"b": 2}),
        make_key("t", two, (), {"a": 1, "b": 2}),
        make_key("t", two, (1, 2)),
        make_key("t", two, (1,)),
    }
    assert keys == {"t:a=1,b=2"}
    assert make_key("t", two, (1, 3)) == "t:a=1,b=3"


def test_builder_is_reusable() -> None:
    builder = KeyBuilder("myapp.sync", customer, ["customer_id"])
    assert builder.name == "myapp.sync"
    assert builder.build((1,)) == "myapp.sync:customer_id=1"
    assert builder.build((), {"customer_id": 2}) == "myapp.sync:customer_id=2"
    assert "myapp.sync" in repr(builder)


# -- Key formats ---------------------------------------------------------------------------


def test_all_arguments_in_signature_order() -> None:
    assert make_key("t", four, (1, "x"), {"d": None}) == 't:a=1,b="x",c=3,d=null'
    assert make_key("t", four, (True, False)) == "t:a=true,b=false,c=3,d=4"


def test_names_in_given_order() -> None:
    key = make_key("t", four, (1, 2), key=["b", "a"])
    assert key == "t:b=2,a=1"


def test_unsafe_values_are_hashed() -> None:
    key = make_key("t", customer, ("a b",))
    part = key.removeprefix("t:customer_id=")
    assert HASHED_PART.fullmatch(part)
    assert make_key("t", customer, ([1, 2],)).startswith("t:customer_id=#")
    assert make_key("t", customer, ("x" * 70,)).startswith("t:customer_id=#")
    assert make_key("t", customer, ("x" * 62,)) == f't:customer_id="{"x" * 62}"'


def test_strings_ints_and_bools_do_not_collide() -> None:
    keys = [make_key("t", customer, (value,)) for value in (1, "1", True, "true", 1.0, None)]
    assert len(set(keys)) == len(keys)


def test_var_args_and_kwargs_are_included() -> None:
    plain = make_key("t", variadic, (1,))
    more = make_key("t", variadic, (1, 2))
    extra = make_key("t", variadic, (1,), {"z": 3})
    assert len({plain, more, extra}) == 3
    assert plain.startswith("t:a=1,args=#")
    assert make_key("t", variadic, (1,), {"x": 1, "y": 2}) == make_key(
        "t", variadic, (), {"y": 2, "a": 1, "x": 1}
    )


def test_format_string_key() -> None:
    builder = KeyBuilder("t", bound, "{customer_id}-{region}", skip_first=True)
    assert builder.build((42,)) == "t:42-eu"
    assert builder.build((), {"customer_id": 42, "region": "us"}) == "t:42-us"
    assert builder.build(("a b",)) == f"t:#{_sha('a b-eu')}"


def test_format_string_with_attribute_and_index_fields() -> None:
    key = make_key("t", two, ({"id": 7}, [5, 6]), key="{a[id]}:{b[1]}")
    assert key == "t:7:6"


def test_callable_key() -> None:
    assert (
        make_key("t", bound, (42,), key=lambda customer_id, region: customer_id, skip_first=True)
        == "t:42"
    )
    assert make_key("t", two, (1,), key=lambda a, b: f"{a}+{b}") == "t:1+2"
    assert make_key("t", two, (1,), key=lambda a, b: [a, b]) == f"t:#{_sha('[1,2]')}"
    assert make_key("t", two, (1,), key=lambda a, b: None) == "t:null"


def test_callable_key_with_bad_result() -> None:
    with pytest.raises(KeyArgumentError, match="set") as info:
        make_key("t", two, (1,), key=lambda a, b: {a})
    assert info.value.value_type == "set"
    assert "'t'" in str(info.value)


def test_no_signature() -> None:
    assert make_key("t", None, (1, "a"), {"z": 1, "b": 2}) == 't:arg0=1,arg1="a",b=2,z=1'
    assert make_key("t", None, (1,), {"region": "eu"}, key=["region"]) == 't:region="eu"'
    assert make_key("t", None, (7,), {"b": 8}, key="{0}-{b}") == "t:7-8"
    assert make_key("t", None, (7,), {"b": 8}, key=lambda a, b: a + b) == "t:15"
    assert make_key("t", None) == "t"


def test_no_signature_needs_keyword_names() -> None:
    with pytest.raises(KeyArgumentError, match=r"'region'.*keyword") as info:
        make_key("t", None, ("eu",), key=["region"])
    assert info.value.argument == "region"


def test_no_signature_rejects_odd_keyword_names() -> None:
    with pytest.raises(KeyArgumentError, match="identifier"):
        make_key("t", None, (), {"a=1,b": 2})


def test_skip_first_skips_self() -> None:
    builder = KeyBuilder("t", bound, ["customer_id"], skip_first=True)
    assert builder.build((42,)) == "t:customer_id=42"
    assert builder.build((), {"customer_id": 42}) == "t:customer_id=42"
    assert make_key("t", bound, (42,), skip_first=True) == 't:customer_id=42,region="eu"'
    with pytest.raises(ConfigurationError, match="'self'"):
        KeyBuilder("t", bound, ["self"], skip_first=True)


def test_skip_first_with_star_args_keeps_them() -> None:
    def run(*args: object) -> None: ...

    assert make_key("t", run, (1,), skip_first=True) == f"t:args=#{_sha('[1]')}"


def test_skip_first_without_a_positional_parameter() -> None:
    def run(*, a: object) -> None: ...

    with pytest.raises(ConfigurationError, match="skip_first"):
        KeyBuilder("t", run, skip_first=True)


def test_kwargs_names_are_looked_up_at_call_time() -> None:
    builder = KeyBuilder("t", variadic, ["customer_id"])
    assert builder.build((1,), {"customer_id": 5}) == "t:customer_id=5"
    assert KeyBuilder("t", variadic, "{customer_id}").build((1,), {"customer_id": 5}) == "t:5"
    with pytest.raises(KeyArgumentError, match="'customer_id'") as info:
        builder.build((1,))
    assert info.value.argument == "customer_id"


def test_dict_key_order_does_not_matter() -> None:
    first = {"a": 1, "b": [1, {"x": 1, "y": 2}]}
    second = OrderedDict([("b", [1, {"y": 2, "x": 1}]), ("a", 1)])
    assert canonical(first) == canonical(second) == '{"a":1,"b":[1,{"x":1,"y":2}]}'
    assert make_key("t", customer, (first,)) == make_key("t", customer, (second,))


def test_long_arguments_give_a_short_key() -> None:
    big = "x" * 1_000_000
    key = make_key("t", two, (big, big))
    assert len(key) <= 200
    assert is_printable_key(key)
    assert make_key("t", two, (big, big)) == key
    assert make_key("t", two, (big, big + "y")) != key


def test_overlong_key_is_hashed_whole() -> None:
    builder = KeyBuilder("t", four, max_length=40)
    key = builder.build((1, 2, 3), {"d": 4})
    assert key == "t:a=1,b=2,c=3,d=4"
    key = builder.build((12345678901, 12345678901, 12345678901))
    assert key == f"t:#{_sha('a=12345678901,b=12345678901,c=12345678901,d=4')}"
    assert len(key) == 2 + 33


def test_non_ascii_values_are_hashed() -> None:
    key = make_key("t", customer, ("café",))
    assert is_printable_key(key)
    assert key == f"t:customer_id=#{_sha(json.dumps('café', ensure_ascii=False))}"
    # A lone surrogate still hashes.
    assert is_printable_key(make_key("t", customer, ("\ud800",)))


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# -- canonical -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (1, "1"),
        (1.0, "1.0"),
        (-0.0, "-0.0"),
        ("a", '"a"'),
        ("é", '"é"'),
        ((1, (2, 3)), "[1,[2,3]]"),
        ([], "[]"),
        ({"b": 1, "a": {}}, '{"a":{},"b":1}'),
        (uuid.UUID(int=1), '"00000000-0000-0000-0000-000000000001"'),
        (decimal.Decimal("1.50"), '"1.50"'),
        (datetime.datetime(2024, 5, 6, 7, 8, 9), '"2024-05-06T07:08:09"'),
        (
            datetime.datetime(2024, 5, 6, tzinfo=datetime.timezone.utc),
            '"2024-05-06T00:00:00+00:00"',
        ),
        (datetime.date(2024, 5, 6), '"2024-05-06"'),
        (datetime.time(7, 8), '"07:08:00"'),
        (Level.LOW, "1"),
        (Name.ACME, '"acme"'),
    ],
)
def test_canonical_values(value: object, text: str) -> None:
    assert canonical(value) == text


def test_canonical_distinguishes_bool_int_float() -> None:
    assert len({canonical(True), canonical(1), canonical(1.0)}) == 3


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (b"x", "bytes"),
        (object(), "object"),
        (Color.RED, "Color"),
        (frozenset(), "frozenset"),
        (1j, "complex"),
    ],
)
def test_canonical_rejects_other_types(value: object, type_name: str) -> None:
    with pytest.raises(KeyArgumentError) as info:
        canonical(value, argument="payload")
    message = str(info.value)
    assert "'payload'" in message
    assert f"type {type_name}" in message
    assert info.value.argument == "payload"
    assert info.value.value_type == type_name
    assert isinstance(info.value, TypeError)


def test_canonical_error_names_the_path() -> None:
    with pytest.raises(KeyArgumentError) as info:
        canonical({"items": [1, 2, {3}]}, argument="payload")
    assert str(info.value) == (
        "argument 'payload' (at payload['items'][2]) has type set, which cannot be made"
        " into a key; pass a JSON-like value or choose key=[...] / a callable"
    )
    assert info.value.argument == "payload"
    assert info.value.value_type == "set"


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, decimal.Decimal("NaN"), decimal.Decimal("-Infinity")],
)
def test_canonical_rejects_non_finite_numbers(value: object) -> None:
    with pytest.raises(KeyArgumentError, match="non-finite") as info:
        canonical([value], argument="x")
    assert "'x' (at x[0])" in str(info.value)
    assert info.value.value_type == type(value).__name__


def test_canonical_rejects_non_str_dict_keys() -> None:
    with pytest.raises(KeyArgumentError, match="dict key 1 of type int") as info:
        canonical({"a": {1: "x"}}, argument="payload")
    assert "payload['a']" in str(info.value)
    assert info.value.value_type == "int"


def test_canonical_rejects_cycles_and_deep_nesting() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(KeyArgumentError, match="contains itself"):
        canonical(loop)
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(KeyArgumentError, match="nested too deeply"):
        canonical(deep)


def test_shared_references_are_not_cycles() -> None:
    shared = [1]
    assert canonical([shared, shared]) == "[[1],[1]]"


# -- Errors --------------------------------------------------------------------------------


def test_argument_error_names_task_argument_and_type() -> None:
    with pytest.raises(KeyArgumentError) as info:
        make_key("myapp.t", customer, ({"items": [{1}]},))
    message = str(info.value)
    assert "'myapp.t'" in message
    assert "'customer_id'" in message
    assert "customer_id['items'][0]" in message
    assert "type set" in message
    assert info.value.argument == "customer_id"
    assert info.value.value_type == "set"


def test_unselected_arguments_may_be_anything() -> None:
    assert make_key("t", two, (1, object()), key=["a"]) == "t:a=1"


def test_binding_failure() -> None:
    with pytest.raises(KeyArgumentError, match=r"'myapp\.t'.*signature") as info:
        make_key("myapp.t", two, (1, 2, 3))
    assert isinstance(info.value, TypeError)
    with pytest.raises(KeyArgumentError, match=r"'myapp\.t'"):
        make_key("myapp.t", two, (), {"nope": 1})


def test_unknown_name() -> None:
    with pytest.raises(ConfigurationError) as info:
        KeyBuilder("myapp.t", four, ["a", "customer"])
    message = str(info.value)
    assert "'myapp.t'" in message
    assert "'customer'" in message
    assert "a, b, c, d" in message
    assert isinstance(info.value, ValueError)


def test_unknown_format_field() -> None:
    with pytest.raises(ConfigurationError, match=r"'myapp.t'.*'region'.*customer_id") as info:
        KeyBuilder("myapp.t", customer, "{customer_id}-{region.code}")
    assert "'region'" in str(info.value)
    with pytest.raises(ConfigurationError, match="'zone'"):
        KeyBuilder("t", customer, "{customer_id:{zone}}")


@pytest.mark.parametrize("fmt", ["{}", "{0}", "{customer_id"])
def test_bad_format_strings(fmt: str) -> None:
    with pytest.raises(ConfigurationError, match="'t'"):
        KeyBuilder("t", customer, fmt)


def test_format_failure_at_call_time() -> None:
    with pytest.raises(KeyArgumentError, match="cannot format"):
        make_key("t", customer, ("x",), key="{customer_id:d}")


@pytest.mark.parametrize(
    ("key", "type_name"), [(42, "int"), ({"a"}, "set"), (b"a", "bytes"), (1.5, "float")]
)
def test_bad_key_type(key: Any, type_name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"not {type_name}"):
        KeyBuilder("t", customer, key)


def test_bad_names() -> None:
    with pytest.raises(ConfigurationError, match="more than once"):
        KeyBuilder("t", customer, ["customer_id", "customer_id"])
    with pytest.raises(ConfigurationError, match="not int"):
        KeyBuilder("t", customer, [1])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="valid argument name"):
        KeyBuilder("t", None, ["a b"])


@pytest.mark.parametrize("name", ["", "a b", "a\nb", "a\tb", "a\x00b"])
def test_bad_task_names(name: str) -> None:
    with pytest.raises(ConfigurationError):
        KeyBuilder(name, customer)


def test_task_name_too_long_for_max_length() -> None:
    KeyBuilder("x" * 166, customer)
    with pytest.raises(ConfigurationError, match="166"):
        KeyBuilder("x" * 167, customer)
    with pytest.raises(ConfigurationError, match="max_length"):
        KeyBuilder("t", customer, max_length=30)


def test_bad_func() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        KeyBuilder("t", 42)  # type: ignore[arg-type]


# -- Properties ----------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    a=json_values,
    b=json_values,
    c=st.none() | json_values,
    d=st.none() | json_values,
    data=st.data(),
)
def test_every_spelling_gives_the_same_key(
    a: object, b: object, c: object, d: object, data: st.DataObject
) -> None:
    builder = KeyBuilder("t", four)
    full_c = 3 if c is None else c
    full_d = 4 if d is None else d
    expected = builder.build((a, b, full_c), {"d": full_d})
    # Choose how many leading arguments are positional and which defaults are omitted.
    positional_count = data.draw(st.integers(0, 3))
    omit_c = c is None and data.draw(st.booleans())
    omit_d = d is None and data.draw(st.booleans())
    values = {"a": a, "b": b, "c": full_c}
    names = ["a", "b", "c"]
    if omit_c:
        names.remove("c")
        positional_count = min(positional_count, 2)
    args = tuple(values[name] for name in names[:positional_count])
    kwargs = {name: values[name] for name in names[positional_count:]}
    if not omit_d:
        kwargs["d"] = full_d
    order = data.draw(st.permutations(list(kwargs)))
    kwargs = {name: kwargs[name] for name in order}
    assert builder.build(args, kwargs) == expected


@given(json_values)
def test_canonical_survives_a_json_round_trip(value: object) -> None:
    assert canonical(json.loads(json.dumps(value))) == canonical(value)
    assert canonical(json.loads(canonical(value))) == canonical(value)


def confuse(value: object) -> object:
    """Return ``value`` with bools made ints and ints made floats (equal in Python)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value) if abs(value) < 2**53 else value
    if isinstance(value, (list, tuple)):
        return [confuse(item) for item in value]
    if isinstance(value, dict):
        return {key: confuse(item) for key, item in value.items()}
    return value


@given(json_values, st.data())
def test_canonical_is_injective(first: object, data: st.DataObject) -> None:
    second = data.draw(
        st.one_of(
            json_values,
            st.just(json.loads(json.dumps(first))),
            st.just(confuse(first)),
        )
    )
    assert (canonical(first) == canonical(second)) == (tagged(first) == tagged(second))


@given(json_values)
def test_canonical_equal_for_equal_data(value: object) -> None:
    copy = json.loads(json.dumps(value))
    assert canonical(copy) == canonical(value)
    assert make_key("t", customer, (copy,)) == make_key("t", customer, (value,))


@given(json_values, json_values)
def test_distinct_values_give_distinct_keys(first: object, second: object) -> None:
    same_key = make_key("t", two, (first, 1)) == make_key("t", two, (second, 1))
    assert same_key == (tagged(first) == tagged(second))


task_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
)


@settings(max_examples=200)
@given(
    name=task_names,
    values=st.lists(json_values | st.text(min_size=100, max_size=5000), min_size=1, max_size=3),
    extra=st.integers(0, 200),
    mode=st.sampled_from(["all", "format", "callable"]),
)
def test_keys_are_short_and_printable(
    name: str, values: list[object], extra: int, mode: str
) -> None:
    max_length = len(name) + 34 + extra

    def f(*args: object) -> None: ...

    def pick(args: tuple[object, ...]) -> object:
        return args

    key_spec: Any = {"format": "{args[0]}", "callable": pick, "all": None}[mode]
    key = make_key(name, f, tuple(values), key=key_spec, max_length=max_length)
    assert len(key) <= max_length
    assert is_printable_key(key)
    assert key == name or key.startswith(name + ":")


# -- format-string keys say what they mean (a key per call, never a silent global key), and
# two calls share a key only when every field's text is the same.


@pytest.mark.parametrize("fmt", ["customer_id", "sync", "customer-{{id}}", ""])
def test_a_format_string_without_fields_is_refused(fmt: str) -> None:
    with pytest.raises(ConfigurationError, match=r"no .*field") as info:
        KeyBuilder("t", customer, fmt)
    message = str(info.value)
    assert "key=[]" in message  # how to ask for one key for every call, on purpose
    if fmt.isidentifier():
        assert f"['{fmt}']" in message and f"'{{{fmt}}}'" in message


def test_format_keys_do_not_collide_when_values_contain_the_separator() -> None:
    builder = KeyBuilder("t", two, "{a}-{b}")
    assert builder.build(("1-2", "3")) != builder.build(("1", "2-3"))
    percent = KeyBuilder("t", two, "{a}:{b}")
    assert percent.build(("%3A", "x")) != percent.build((":", "x"))


def test_single_field_format_keys_are_unchanged() -> None:
    assert make_key("t", customer, (42,), key="{customer_id}") == "t:42"
    assert make_key("t", customer, ("a-b",), key="cust-{customer_id}") == "t:cust-a-b"
    assert make_key("t", customer, ("50%",), key="{customer_id}") == f"t:#{_sha('50%')}"
    # and two-field keys of plain values read as before
    assert make_key("t", two, (7, "eu"), key="{a}-{b}") == "t:7-eu"


@pytest.mark.parametrize(
    ("fmt", "words"),
    [
        ("{a}{b}", "nothing between"),
        ("x{a}{b}y", "nothing between"),
        ("{a}%{b}", "'%'"),
        ("{a}2{b}", "'2'"),
        ("{a}A{b}", "'A'"),
        ("{a}-{b:{a}}", "nested"),
    ],
)
def test_ambiguous_formats_are_refused(fmt: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        KeyBuilder("t", two, fmt)
    assert fmt in str(info.value)


FIELDS = ("a", "b", "c", "d")
# Characters that make trouble: separators, the escape character, hex digits, a space.
TEXT = st.text(alphabet="-_:%,.=|aAbF09 é", max_size=6)


def four_texts(a: object, b: object, c: object, d: object) -> None: ...


def refused(literals: list[str]) -> bool:
    """The documented rule: a separator between two fields is empty or starts like %XX."""
    return any(not sep or sep[0] in "%0123456789ABCDEF" for sep in literals[1:-1])


@settings(max_examples=400, deadline=None)
@given(
    names=st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4),
    literals=st.data(),
    values=st.data(),
)
def test_format_keys_are_unambiguous(names: list[str], literals: Any, values: Any) -> None:
    # Given a random format of the fields a..d with random literals between them
    texts = [literals.draw(TEXT) for _ in range(len(names) + 1)]
    pairs = zip(names, texts[1:], strict=True)
    fmt = texts[0] + "".join(f"{{{name}}}{text}" for name, text in pairs)
    if refused(texts):
        with pytest.raises(ConfigurationError, match=r"separat|between"):
            KeyBuilder("t", four_texts, fmt)
        return
    builder = KeyBuilder("t", four_texts, fmt)
    # When two random calls are keyed
    used = sorted(set(names))
    first = {f: values.draw(TEXT) for f in FIELDS}
    second = {f: values.draw(st.sampled_from([first[f], values.draw(TEXT)])) for f in FIELDS}
    # Then they share a key exactly when the fields the format uses are equal
    same = all(first[f] == second[f] for f in used)
    assert (builder.build((), first) == builder.build((), second)) == same, (fmt, first, second)


def test_escaped_braces_are_part_of_the_separator() -> None:
    builder = KeyBuilder("t", two, "{a}x{{y{b}")
    assert builder.build(("1x{y2", "3")) != builder.build(("1", "2x{y3"))
    with pytest.raises(ConfigurationError, match="nothing between"):
        KeyBuilder("t", four, "{a}-{b}{c}")
