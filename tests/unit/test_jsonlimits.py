"""Bounded JSON parsing: a document nested too deep is a ValueError, never a RecursionError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maas_worker import jsonlimits
from maas_worker.jsonlimits import depth_within, loads

#: Far deeper than Python's recursion limit: json.loads itself raises RecursionError.
ABYSS = 200_000


def nested(depth: int, *, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def as_bytes_too(text: str) -> list[str | bytes]:
    return [text, text.encode()]


@pytest.mark.parametrize(
    "doc",
    as_bytes_too('{"a": [1, 2, {"b": null}], "c": "x"}')
    + as_bytes_too("[]")
    + as_bytes_too('"plain"')
    + as_bytes_too("42"),
)
def test_shallow_documents_pass_and_parse_as_json_does(doc: str | bytes) -> None:
    assert depth_within(doc, 3)
    assert loads(doc, max_depth=3) == json.loads(doc)


def test_few_brackets_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no more brackets than the limit there is nothing to measure.
    class Boom:
        """A string-literal pattern that fails the test once used."""

        def sub(self, *_: Any) -> Any:
            raise AssertionError("scanned")

    monkeypatch.setattr(jsonlimits, "_STRING", Boom())
    doc = '{"a": [1, 2, {"b": [null]}]}'
    assert depth_within(doc, 4)
    assert depth_within(doc.encode(), 4)
    with pytest.raises(AssertionError, match="scanned"):
        depth_within(doc, 3)  # more brackets than the limit: measured


@pytest.mark.parametrize(
    "doc",
    as_bytes_too("[" * ABYSS) + as_bytes_too(nested(ABYSS)) + as_bytes_too(nested_objects(ABYSS)),
)
def test_an_abyss_is_a_value_error_not_a_recursion_error(doc: str | bytes) -> None:
    with pytest.raises(RecursionError):
        json.loads(doc)  # what the bound protects against
    assert not depth_within(doc, jsonlimits.MAX_INPUT_DEPTH)
    with pytest.raises(ValueError, match="nested deeper than 64"):
        loads(doc, max_depth=jsonlimits.MAX_INPUT_DEPTH)


@pytest.mark.parametrize("limit", [1, 2, 16, 64])
@pytest.mark.parametrize("shape", ["lists", "objects"])
def test_depth_exactly_at_the_limit_passes_one_more_fails(limit: int, shape: str) -> None:
    def make(depth: int) -> str:
        return nested(depth) if shape == "lists" else nested_objects(depth)

    for doc in as_bytes_too(make(limit)):
        assert depth_within(doc, limit)
        assert loads(doc, max_depth=limit) == json.loads(doc)
    for doc in as_bytes_too(make(limit + 1)):
        assert not depth_within(doc, limit)
        with pytest.raises(ValueError, match=f"deeper than {limit} levels"):
            loads(doc, max_depth=limit)


def test_siblings_do_not_add_up() -> None:
    # Many brackets (past the fast path), but never more than 2 open at once.
    doc = json.dumps([[i] for i in range(1000)])
    for text in as_bytes_too(doc):
        assert depth_within(text, 2)
        assert not depth_within(text, 1)
        assert loads(text, max_depth=2) == json.loads(doc)


@pytest.mark.parametrize(
    "value",
    [
        "[[[[[[[[[[",
        "{{{{{{{{{{",
        '"[[[[ \\" [[[[[ still inside',
        '\\\\"',  # an escaped backslash, then the string ends
        "]]]]]]]]]]]",
        "\\u005b\\u005b",
    ],
)
def test_brackets_inside_strings_do_not_count(value: str) -> None:
    doc = json.dumps({"key [[[[[[[[[[": [value, value * 20], value: {"x": value}})
    assert doc.count("[") + doc.count("{") > 10  # past the fast path
    for text in as_bytes_too(doc):
        assert depth_within(text, 2)
        assert loads(text, max_depth=2) == json.loads(doc)
    for text in as_bytes_too(json.dumps([[[value]]])):
        assert depth_within(text, 3)
        assert not depth_within(text, 2)


def test_an_escaped_quote_does_not_end_a_string() -> None:
    # If \" ended the string, the brackets after it would count: 20 deep.
    doc = '["\\"' + "[" * 20 + '"]'
    assert json.loads(doc) == ['"' + "[" * 20]
    for text in as_bytes_too(doc):
        assert depth_within(text, 1)
        assert loads(text, max_depth=1) == json.loads(doc)


def test_a_deep_document_hidden_after_a_string_is_found() -> None:
    doc = '["a string with [ and ] and \\" inside", ' + nested(30) + "]"
    for text in as_bytes_too(doc):
        assert depth_within(text, 31)
        assert not depth_within(text, 30)


def test_size_is_refused_before_parsing() -> None:
    doc = json.dumps(["x" * 100])
    for text in as_bytes_too(doc):
        assert loads(text, max_depth=4, max_size=len(doc)) == ["x" * 100]
        with pytest.raises(ValueError, match=f"over {len(doc) - 1} characters"):
            loads(text, max_depth=4, max_size=len(doc) - 1)
    # Size first: an abyss over the size limit is refused as too large.
    with pytest.raises(ValueError, match="over 10 characters"):
        loads("[" * ABYSS, max_depth=4, max_size=10)


@pytest.mark.parametrize("doc", ["", "not json", "[1,", '{"a" 1}', b"\xff\xfe[", "[]]]"])
def test_invalid_documents_are_value_errors(doc: str | bytes) -> None:
    with pytest.raises(ValueError):
        loads(doc, max_depth=4)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), inner, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_depth_matches_the_parsed_documents_on_any_json(value: Any) -> None:
    text = json.dumps(value)
    true_depth = _depth(value)
    for limit in range(true_depth + 2):
        assert depth_within(text, limit) == (true_depth <= limit)
        assert depth_within(text.encode(), limit) == (true_depth <= limit)
