"""Unit tests for pipeline.structured (no network)."""

from __future__ import annotations

import copy
import csv
import datetime
import json
import string
import tomllib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.errors import JobError
from pipeline.providers import request_fields
from pipeline.structured import StructuredSpec
from pipeline.structured import spec as structured

REPO = Path(__file__).resolve().parents[2]
LABELS = ["positive", "negative", "neutral"]

CONTACT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "company": {"type": ["string", "null"]},
        "email": {"type": ["string", "null"]},
        "employees": {"type": ["integer", "null"]},
        "is_customer": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}},
    },
}

VALID_CONTACT: dict[str, Any] = {
    "name": "Maria Lindqvist",
    "company": "Nordvik Timber AB",
    "email": None,
    "employees": 240,
    "is_customer": False,
    "topics": ["pricing", "delivery"],
}


def labels_spec(prefix: str = "") -> StructuredSpec:
    spec = StructuredSpec.from_job(labels=list(LABELS), json_schema=None, json_schema_file=None, column_prefix=prefix)
    assert spec is not None
    return spec


def schema_spec(schema: dict, prefix: str = "") -> StructuredSpec:
    spec = StructuredSpec.from_job(labels=None, json_schema=schema, json_schema_file=None, column_prefix=prefix)
    assert spec is not None
    return spec


def one_prop(prop: dict) -> StructuredSpec:
    return schema_spec({"type": "object", "properties": {"x": prop}})


def assert_one_line_error(error: str | None) -> None:
    assert error is not None
    assert error.startswith("invalid reply: ")
    assert "\n" not in error
    assert len(error) <= 200


# ------------------------------------------------------------------ from_job


def test_neither_set_returns_none() -> None:
    assert StructuredSpec.from_job(labels=None, json_schema=None, json_schema_file=None) is None


def test_label_schema_shape() -> None:
    spec = labels_spec()
    assert spec.schema == {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": LABELS}},
        "required": ["label"],
        "additionalProperties": False,
    }
    assert spec.columns == [("label", pa.string())]


def test_label_column_prefixed() -> None:
    assert labels_spec("llm_").columns == [("llm_label", pa.string())]


def test_labels_not_mutated_by_caller() -> None:
    labels = list(LABELS)
    spec = StructuredSpec.from_job(labels=labels, json_schema=None, json_schema_file=None)
    labels.append("other")
    assert spec is not None
    assert spec.schema["properties"]["label"]["enum"] == LABELS


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ([], "is empty"),
        (["a", "b", "a"], "'a' appears twice"),
        (["a", ""], "empty label"),
        (["a", "  "], "empty label"),
        (["a", " b"], "leading or trailing spaces"),
        (["a", 3], "list of strings"),
        ("positive", "list of strings"),
    ],
)
def test_bad_labels(labels: Any, fragment: str) -> None:
    with pytest.raises(JobError, match="labels") as info:
        StructuredSpec.from_job(labels=labels, json_schema=None, json_schema_file=None)
    assert fragment in str(info.value)


def test_labels_and_schema_both_set() -> None:
    with pytest.raises(JobError, match="labels and json_schema"):
        StructuredSpec.from_job(labels=LABELS, json_schema=CONTACT_SCHEMA, json_schema_file=None)


def test_inline_schema_and_file_both_set(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="json_schema and json_schema_file"):
        StructuredSpec.from_job(labels=None, json_schema=CONTACT_SCHEMA, json_schema_file=tmp_path / "s.json")


def test_bad_prefix_type() -> None:
    with pytest.raises(JobError, match="column_prefix"):
        StructuredSpec.from_job(
            labels=LABELS,
            json_schema=None,
            json_schema_file=None,
            column_prefix=3,  # type: ignore[arg-type]
        )


# ----------------------------------------------------------- column types


@pytest.mark.parametrize(
    ("prop", "arrow"),
    [
        ({"type": "string"}, pa.string()),
        ({"type": "integer"}, pa.int64()),
        ({"type": "number"}, pa.float64()),
        ({"type": "boolean"}, pa.bool_()),
        ({"type": "string", "enum": ["a", "b"]}, pa.string()),
        ({"type": ["string", "null"]}, pa.string()),
        ({"type": ["null", "integer"]}, pa.int64()),
        ({"type": "array", "items": {"type": "number"}}, pa.list_(pa.float64())),
        ({"type": "array", "items": {"type": ["string", "null"]}}, pa.list_(pa.string())),
        (
            {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            pa.list_(pa.list_(pa.int64())),
        ),
        (
            {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            },
            pa.struct([pa.field("city", pa.string()), pa.field("zip", pa.string())]),
        ),
        (
            {
                "type": ["object", "null"],
                "properties": {
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "geo": {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    },
                },
            },
            pa.struct(
                [
                    pa.field("tags", pa.list_(pa.string())),
                    pa.field(
                        "geo",
                        pa.struct([pa.field("lat", pa.float64()), pa.field("lon", pa.float64())]),
                    ),
                ]
            ),
        ),
        (
            {
                "type": "array",
                "items": {"type": "object", "properties": {"n": {"type": "integer"}}},
            },
            pa.list_(pa.struct([pa.field("n", pa.int64())])),
        ),
    ],
)
def test_arrow_type_per_json_type(prop: dict, arrow: pa.DataType) -> None:
    spec = one_prop(prop)
    assert spec.columns == [("x", arrow)]
    (array,) = spec.to_arrays([None, None])
    assert array.type == arrow


def test_columns_follow_property_order_with_prefix() -> None:
    spec = schema_spec(CONTACT_SCHEMA, prefix="llm_")
    assert spec.columns == [
        ("llm_name", pa.string()),
        ("llm_company", pa.string()),
        ("llm_email", pa.string()),
        ("llm_employees", pa.int64()),
        ("llm_is_customer", pa.bool_()),
        ("llm_topics", pa.list_(pa.string())),
    ]


def test_all_null_columns_are_typed() -> None:
    spec = schema_spec(CONTACT_SCHEMA)
    arrays = spec.to_arrays([None, None, None])
    assert [a.type for a in arrays] == [t for _, t in spec.columns]
    assert all(a.null_count == 3 for a in arrays)
    # The same holds for zero rows.
    assert [a.type for a in spec.to_arrays([])] == [t for _, t in spec.columns]


def test_to_arrays_from_parsed_rows() -> None:
    schema = {
        "type": "object",
        "properties": {
            "score": {"type": "number"},
            "count": {"type": ["integer", "null"]},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "n": {"type": "number"}},
            },
        },
    }
    spec = schema_spec(schema, prefix="p_")
    reply = {
        "score": 3,
        "count": None,
        "ok": True,
        "tags": ["a"],
        "where": {"city": "Oslo", "n": 1},
    }
    row, error = spec.parse(json.dumps(reply), "stop")
    assert error is None
    table = pa.Table.from_arrays(spec.to_arrays([row, None]), names=[n for n, _ in spec.columns])
    assert table.schema.field("p_score").type == pa.float64()
    assert table.to_pylist() == [
        {
            "p_score": 3.0,
            "p_count": None,
            "p_ok": True,
            "p_tags": ["a"],
            "p_where": {"city": "Oslo", "n": 1.0},
        },
        {"p_score": None, "p_count": None, "p_ok": None, "p_tags": None, "p_where": None},
    ]


# ------------------------------------------------------------ strict schema


def test_strict_rewrite_adds_required_and_additional_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {
                "type": "array",
                "items": {"type": "object", "properties": {"c": {"type": "integer"}}},
            },
            "d": {"type": "object", "properties": {"e": {"type": "boolean"}}},
        },
    }
    original = copy.deepcopy(schema)
    spec = schema_spec(schema)
    assert schema == original, "the job's dict must not be modified"
    sent = spec.schema
    assert sent["required"] == ["a", "b", "d"]
    assert sent["additionalProperties"] is False
    item = sent["properties"]["b"]["items"]
    assert item["required"] == ["c"] and item["additionalProperties"] is False
    nested = sent["properties"]["d"]
    assert nested["required"] == ["e"] and nested["additionalProperties"] is False
    # Types of omitted-`required` properties are unchanged (not made nullable).
    assert sent["properties"]["a"]["type"] == "string"


def test_strict_rewrite_makes_unlisted_properties_nullable() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "string", "enum": ["x", "y"]},
            "c": {"type": ["integer", "null"]},
            "d": {"type": "string", "const": "k"},
        },
        "required": ["a"],
    }
    spec = schema_spec(schema)
    props = spec.schema["properties"]
    assert spec.schema["required"] == ["a", "b", "c", "d"]
    assert props["a"]["type"] == "string"
    assert props["b"] == {"type": ["string", "null"], "enum": ["x", "y", None]}
    assert props["c"]["type"] == ["integer", "null"]
    assert props["d"] == {"type": ["string", "null"], "enum": ["k", None]}
    row, error = spec.parse('{"a": "v", "b": null, "c": null, "d": null}', "stop")
    assert error is None
    assert row == {"a": "v", "b": None, "c": None, "d": None}


def test_explicit_additional_properties_false_is_kept() -> None:
    spec = one_prop({"type": "object", "properties": {"k": {"type": "string"}}, "additionalProperties": False})
    assert spec.schema["properties"]["x"]["additionalProperties"] is False


# --------------------------------------------------------------- bad schema


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({}, '"type": "object"'),
        ({"type": "array", "items": {"type": "string"}}, '"type": "object"'),
        ({"type": "object"}, '"properties"'),
        ({"type": "object", "properties": {}}, '"properties"'),
        ([1, 2], '"type": "object"'),
        ({"type": "object", "properties": {"": {"type": "string"}}}, "empty name"),
        ({"type": "object", "properties": {"a": {}}}, "property 'a' has no \"type\""),
        ({"type": "object", "properties": {"a": {"enum": ["x"]}}}, "property 'a' has no"),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}},
            "property 'a' uses \"anyOf\"",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/x"}},
                "$defs": {"x": {"type": "string"}},
            },
            "property 'a' uses \"$ref\"",
        ),
        (
            {"type": "object", "properties": {"a": {"type": ["string", "integer"]}}},
            "property 'a' must have exactly one",
        ),
        ({"type": "object", "properties": {"a": {"type": "null"}}}, "property 'a' must have"),
        (
            {"type": "object", "properties": {"a": {"type": "array"}}},
            "property 'a' is an array without",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "object"}}},
            "property 'a' is an object without",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "properties": {"b": {"type": "array", "items": {}}}}},
            },
            "property 'a.b[]' has no \"type\"",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "properties": {"b": {"oneOf": [{"type": "string"}]}}}},
            },
            "property 'a.b' uses \"oneOf\"",
        ),
        ({"type": "object", "properties": {"a": {"type": 5}}}, "not a valid JSON schema"),
        (
            {"type": "object", "properties": {"a": {"type": "strin"}}},
            "not a valid JSON schema",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}},
            "not a valid JSON schema",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
            "requires unknown property 'b'",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": True,
            },
            "additionalProperties",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "a": {
                        "type": "object",
                        "properties": {"b": {"type": "string"}},
                        "additionalProperties": {"type": "string"},
                    }
                },
            },
            "property 'a' must not allow \"additionalProperties\"",
        ),
    ],
)
def test_bad_schema(schema: Any, fragment: str) -> None:
    with pytest.raises(JobError) as info:
        StructuredSpec.from_job(labels=None, json_schema=schema, json_schema_file=None)
    message = str(info.value)
    assert message.startswith("`[prompt] json_schema`")
    assert fragment in message
    assert "\n" not in message


def test_non_json_schema_type_name() -> None:
    # "date" is not a JSON Schema type: the metaschema check reports it.
    with pytest.raises(JobError, match="not a valid JSON schema"):
        one_prop({"type": "date"})


def test_toml_date_in_schema_is_rejected() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "default": datetime.date(2024, 1, 1)}},
    }
    with pytest.raises(JobError, match="only JSON values"):
        schema_spec(schema)


# ------------------------------------------------------------- schema files


def test_schema_file_good(tmp_path: Path) -> None:
    path = tmp_path / "contact.json"
    path.write_text(json.dumps(CONTACT_SCHEMA), encoding="utf-8")
    spec = StructuredSpec.from_job(labels=None, json_schema=None, json_schema_file=path)
    assert spec is not None
    assert [name for name, _ in spec.columns] == list(CONTACT_SCHEMA["properties"])
    assert spec.identity() == schema_spec(CONTACT_SCHEMA).identity()


def test_schema_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(JobError) as info:
        StructuredSpec.from_job(labels=None, json_schema=None, json_schema_file=path)
    message = str(info.value)
    assert "json_schema_file" in message and str(path) in message
    assert "No such file" in message


def test_schema_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="cannot read"):
        StructuredSpec.from_job(labels=None, json_schema=None, json_schema_file=tmp_path)


def test_schema_file_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"type": "object",\n  properties: {}}', encoding="utf-8")
    with pytest.raises(JobError) as info:
        StructuredSpec.from_job(labels=None, json_schema=None, json_schema_file=path)
    message = str(info.value)
    assert str(path) in message and "not valid JSON" in message and "line 2" in message


def test_schema_file_bad_schema_names_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    schema = {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}}
    path.write_text(json.dumps(schema), encoding="utf-8")
    with pytest.raises(JobError) as info:
        StructuredSpec.from_job(labels=None, json_schema=None, json_schema_file=path)
    assert str(path) in str(info.value) and "property 'a'" in str(info.value)


# ----------------------------------------------------------- request_fields


@pytest.mark.parametrize("profile", ["openrouter", "openai", "mistral"])
def test_request_fields_json_schema_profiles(profile: str) -> None:
    spec = labels_spec()
    fields = request_fields(spec, profile)
    assert fields["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "strict": True, "schema": spec.schema},
    }
    if profile == "openrouter":
        assert fields["provider"] == {"require_parameters": True}
        assert set(fields) == {"response_format", "provider"}
    else:
        assert set(fields) == {"response_format"}


def test_request_fields_local() -> None:
    spec = schema_spec(CONTACT_SCHEMA)
    assert request_fields(spec, "local") == {"response_format": {"type": "json_object", "schema": spec.schema}}


def test_request_fields_unknown_profile() -> None:
    with pytest.raises(JobError, match="unknown provider 'bedrock'"):
        request_fields(labels_spec(), "bedrock")


def test_request_fields_are_copies() -> None:
    spec = labels_spec()
    fields = request_fields(spec, "openai")
    fields["response_format"]["json_schema"]["schema"]["properties"].clear()
    assert spec.schema["properties"]["label"]["enum"] == LABELS


def test_request_fields_json_serialisable() -> None:
    spec = schema_spec(CONTACT_SCHEMA)
    for profile in ("openrouter", "openai", "mistral", "local"):
        json.dumps(request_fields(spec, profile))


# -------------------------------------------------------------- parse: labels


@pytest.mark.parametrize(
    "content",
    [
        '{"label": "negative"}',
        '  {"label":"negative"}\n',
        '```json\n{"label": "negative"}\n```',
        "negative",
        "  negative \n",
        '"negative"',
        "'negative'",
        "`negative`",
        '" negative "',
    ],
)
def test_parse_label_ok(content: str) -> None:
    assert labels_spec().parse(content, "stop") == ({"label": "negative"}, None)


def test_parse_label_prefixed_column() -> None:
    assert labels_spec("llm_").parse("neutral", "stop") == ({"llm_label": "neutral"}, None)


@pytest.mark.parametrize(
    ("content", "label"),
    [
        ('{"label": "mixed"}', "mixed"),
        ("mixed", "mixed"),
        ("Positive", "Positive"),
        ('"positive.', '"positive.'),
        ("positive.", "positive."),
    ],
)
def test_parse_label_outside_set(content: str, label: str) -> None:
    assert labels_spec().parse(content, "stop") == (
        None,
        f"invalid reply: label '{label}' is not one of positive, negative, neutral",
    )


def test_parse_label_long_chatty_reply_is_clipped() -> None:
    content = "I think that the sentiment of this review is\nclearly positive overall. " * 20
    row, error = labels_spec().parse(content, "stop")
    assert row is None
    assert_one_line_error(error)
    assert "is not one of positive, negative, neutral" in str(error)


def test_parse_label_fenced_json_string() -> None:
    assert labels_spec().parse('```json\n"neutral"\n```', "stop") == ({"label": "neutral"}, None)


def test_parse_label_numeric_labels() -> None:
    spec = StructuredSpec.from_job(labels=["1", "2", "3"], json_schema=None, json_schema_file=None)
    assert spec is not None
    assert spec.parse("3", "stop") == ({"label": "3"}, None)
    assert spec.parse('{"label": "2"}', "stop") == ({"label": "2"}, None)
    assert spec.parse("```\n1\n```", "stop") == ({"label": "1"}, None)


def test_parse_label_bad_objects() -> None:
    spec = labels_spec()
    _, error = spec.parse('{"label": "positive", "why": "x"}', "stop")
    assert error == ("invalid reply: Additional properties are not allowed ('why' was unexpected)")
    _, error = spec.parse('{"sentiment": "positive"}', "stop")
    assert error is not None and "'label' is a required property" in error
    _, error = spec.parse('{"label": 1}', "stop")
    assert error == "invalid reply: 'label' is not of type 'string'"
    _, error = spec.parse('["positive"]', "stop")
    assert error == "invalid reply: expected a JSON object, got array"


def test_parse_label_truncated_object_is_json_error() -> None:
    row, error = labels_spec().parse('{"label": "posi', "stop")
    assert row is None
    assert error is not None and error.startswith("invalid reply: not JSON (")


# --------------------------------------------------------- parse: json schema


def test_parse_contact_ok() -> None:
    spec = schema_spec(CONTACT_SCHEMA)
    assert spec.parse(json.dumps(VALID_CONTACT), "stop") == (VALID_CONTACT, None)


def test_parse_prefixed_keys() -> None:
    spec = schema_spec({"type": "object", "properties": {"a": {"type": "string"}}}, "llm_")
    assert spec.parse('{"a": "v"}', "stop") == ({"llm_a": "v"}, None)


@pytest.mark.parametrize("finish_reason", ["length", "model_length"])
def test_parse_truncated(finish_reason: str) -> None:
    row, error = schema_spec(CONTACT_SCHEMA).parse('{"name": "Mar', finish_reason)
    assert row is None
    assert error is not None and error.startswith("invalid reply: truncated at ")
    if finish_reason == "length":
        assert error == "invalid reply: truncated at max_tokens"
    # Labels too, even when the bare text happens to be a label.
    assert labels_spec().parse("positive", finish_reason)[1] == error


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_parse_empty(content: str | None) -> None:
    assert schema_spec(CONTACT_SCHEMA).parse(content, "stop") == (
        None,
        "invalid reply: empty content",
    )
    assert labels_spec().parse(content, None) == (None, "invalid reply: empty content")


def test_parse_not_json() -> None:
    spec = one_prop({"type": "string"})
    assert spec.parse("Sure! Here you go.", "stop") == (
        None,
        "invalid reply: not JSON (Expecting value at char 0)",
    )
    _, error = spec.parse('{"x": "a",}', "stop")
    assert error is not None and error.startswith("invalid reply: not JSON (Expecting property")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_parse_rejects_non_json_constants(constant: str) -> None:
    _, error = one_prop({"type": "number"}).parse(f'{{"x": {constant}}}', "stop")
    assert error == f"invalid reply: not JSON ({constant} is not allowed)"


def test_parse_number_overflow() -> None:
    _, error = one_prop({"type": "number"}).parse('{"x": 1e999}', "stop")
    assert error == "invalid reply: 'x' is too large for a 64-bit float"


def test_parse_deeply_nested_json() -> None:
    _, error = one_prop({"type": "string"}).parse("[" * 100_000, "stop")
    assert_one_line_error(error)


@pytest.mark.parametrize(
    "content",
    [
        '```json\n{"x": "v"}\n```',
        '```JSON\n{"x": "v"}\n```',
        '```\n{"x": "v"}\n```',
        '```json{"x": "v"}```',
        'Here is the result:\n\n```json\n{"x": "v"}\n```\nLet me know if you need more.',
    ],
)
def test_parse_fenced_json(content: str) -> None:
    assert one_prop({"type": "string"}).parse(content, "stop") == ({"x": "v"}, None)


def test_parse_fence_inside_json_string_is_kept() -> None:
    content = json.dumps({"x": "use ```code``` here"})
    assert one_prop({"type": "string"}).parse(content, "stop") == (
        {"x": "use ```code``` here"},
        None,
    )


def test_parse_bad_fenced_json_reports_inner_error() -> None:
    _, error = one_prop({"type": "string"}).parse('```json\n{"x": }\n```', "stop")
    assert error is not None and error.startswith("invalid reply: not JSON (Expecting value")


def test_parse_wrong_type() -> None:
    spec = schema_spec({"type": "object", "properties": {"age": {"type": "integer"}}})
    assert spec.parse('{"age": "forty"}', "stop") == (
        None,
        "invalid reply: 'age' is not of type 'integer'",
    )


def test_parse_bool_is_not_an_integer_or_number() -> None:
    assert one_prop({"type": "integer"}).parse('{"x": true}', "stop")[1] == (
        "invalid reply: 'x' is not of type 'integer'"
    )
    assert one_prop({"type": "number"}).parse('{"x": false}', "stop")[1] == (
        "invalid reply: 'x' is not of type 'number'"
    )


def test_parse_nullable_wrong_type_lists_both() -> None:
    _, error = one_prop({"type": ["integer", "null"]}).parse('{"x": "1"}', "stop")
    assert error == "invalid reply: 'x' is not of type 'integer', 'null'"


def test_parse_nested_wrong_type_names_path() -> None:
    spec = one_prop(
        {
            "type": "array",
            "items": {"type": "object", "properties": {"n": {"type": "integer"}}},
        }
    )
    _, error = spec.parse('{"x": [{"n": 1}, {"n": "two"}]}', "stop")
    assert error == "invalid reply: 'x[1].n' is not of type 'integer'"


def test_parse_missing_and_extra_properties() -> None:
    spec = schema_spec(CONTACT_SCHEMA)
    _, error = spec.parse('{"name": "A"}', "stop")
    assert error is not None and "is a required property" in error
    full: dict[str, Any] = {
        "name": "A",
        "company": None,
        "email": None,
        "employees": None,
        "is_customer": True,
        "topics": [],
        "phone": "1",
    }
    _, error = spec.parse(json.dumps(full), "stop")
    assert error == "invalid reply: Additional properties are not allowed ('phone' was unexpected)"


def test_parse_not_an_object() -> None:
    spec = one_prop({"type": "string"})
    assert spec.parse('"just a string"', "stop")[1] == ("invalid reply: expected a JSON object, got string")
    assert spec.parse("42", "stop")[1] == "invalid reply: expected a JSON object, got number"
    assert spec.parse("null", "stop")[1] == "invalid reply: expected a JSON object, got null"


def test_parse_enum_violation_names_property() -> None:
    spec = one_prop({"type": "string", "enum": ["a", "b"]})
    _, error = spec.parse('{"x": "c"}', "stop")
    assert error == "invalid reply: 'x': 'c' is not one of ['a', 'b']"


def test_parse_converts_numbers() -> None:
    spec = schema_spec(
        {
            "type": "object",
            "properties": {
                "f": {"type": "number"},
                "i": {"type": "integer"},
                "fs": {"type": "array", "items": {"type": "number"}},
                "o": {"type": "object", "properties": {"g": {"type": ["number", "null"]}}},
            },
        }
    )
    row, error = spec.parse('{"f": 2, "i": 3.0, "fs": [1, 2.5], "o": {"g": 7}}', "stop")
    assert error is None and row is not None
    assert row == {"f": 2.0, "i": 3, "fs": [1.0, 2.5], "o": {"g": 7.0}}
    assert type(row["f"]) is float and type(row["i"]) is int
    assert all(type(v) is float for v in row["fs"]) and type(row["o"]["g"]) is float
    # Non-integral floats are not integers.
    assert spec.parse('{"f": 1, "i": 3.5, "fs": [], "o": {"g": null}}', "stop")[1] == (
        "invalid reply: 'i' is not of type 'integer'"
    )


def test_parse_integer_out_of_int64_range() -> None:
    _, error = one_prop({"type": "integer"}).parse('{"x": 9223372036854775808}', "stop")
    assert error == "invalid reply: 'x' is out of range for a 64-bit integer"
    row, error = one_prop({"type": "integer"}).parse('{"x": -9223372036854775808}', "stop")
    assert error is None and row == {"x": -(2**63)}


def test_parse_error_messages_are_short_and_one_line() -> None:
    spec = one_prop({"type": "string", "enum": [c * 30 for c in string.ascii_lowercase]})
    _, error = spec.parse('{"x": "nope"}', "stop")
    assert_one_line_error(error)
    _, error = one_prop({"type": "string"}).parse('{\n  "x": \n', "stop")
    assert_one_line_error(error)


def test_validator_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = schema_spec(CONTACT_SCHEMA)

    def no_new_validators(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parse() must reuse the validator built in __init__")

    monkeypatch.setattr(structured, "Draft202012Validator", no_new_validators)
    assert spec.parse('{"name": 1}', "stop")[0] is None
    assert spec.parse(json.dumps(VALID_CONTACT), "stop") == (VALID_CONTACT, None)


# ---------------------------------------------------------------- identity


def test_identity_is_json_and_depends_on_schema_and_prefix() -> None:
    base = labels_spec().identity()
    json.dumps(base)
    assert base["schema"] == labels_spec().schema
    assert base == labels_spec().identity()
    assert base != labels_spec("llm_").identity()
    other = StructuredSpec.from_job(labels=["positive", "negative"], json_schema=None, json_schema_file=None)
    assert other is not None and base != other.identity()
    assert schema_spec(CONTACT_SCHEMA).identity()["schema"] == schema_spec(CONTACT_SCHEMA).schema


def test_identity_equal_for_equivalent_spellings() -> None:
    short = {"type": "object", "properties": {"a": {"type": "string"}}}
    long = {**short, "required": ["a"], "additionalProperties": False}
    assert schema_spec(short).identity() == schema_spec(long).identity()


# ----------------------------------------------------------------- clashes


def test_check_clashes_input_column() -> None:
    spec = labels_spec()
    with pytest.raises(JobError) as info:
        spec.check_clashes(["id", "text", "label"])
    message = str(info.value)
    assert "'label'" in message and "input column" in message
    assert "`[prompt] column_prefix`" in message
    labels_spec("llm_").check_clashes(["id", "text", "label"])


@pytest.mark.parametrize("reserved", StructuredSpec.RESERVED)
def test_check_clashes_reserved(reserved: str) -> None:
    spec = schema_spec({"type": "object", "properties": {reserved: {"type": "string"}}})
    with pytest.raises(JobError, match=r"`\[prompt\] column_prefix`"):
        spec.check_clashes(["id"])
    schema_spec({"type": "object", "properties": {reserved: {"type": "string"}}}, prefix="llm_").check_clashes(["id"])


def test_reserved_columns() -> None:
    assert StructuredSpec.RESERVED == [
        "completion",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "cost_usd",
        "model",
        "provider",
        "generation_id",
        "attempts",
        "attempt_costs",
        "latency_s",
        "error",
    ]


def test_check_clashes_prefixed_name_against_input() -> None:
    spec = labels_spec("llm_")
    with pytest.raises(JobError, match="'llm_label'"):
        spec.check_clashes(["llm_label"])


# ---------------------------------------------------------- example jobs


def load_job(name: str) -> dict:
    with (REPO / "jobs" / name).open("rb") as f:
        return tomllib.load(f)


def read_csv(path: str) -> list[dict[str, str]]:
    with (REPO / path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def spec_from_prompt(prompt: dict) -> StructuredSpec | None:
    schema_file = prompt.get("json_schema_file")
    return StructuredSpec.from_job(
        labels=prompt.get("labels"),
        json_schema=prompt.get("json_schema"),
        json_schema_file=Path(schema_file) if schema_file else None,
        column_prefix=prompt.get("column_prefix", ""),
    )


@pytest.mark.parametrize(
    ("job", "columns"),
    [
        ("label_reviews.toml", [("label", pa.string())]),
        (
            "extract_contacts.toml",
            [
                ("name", pa.string()),
                ("company", pa.string()),
                ("email", pa.string()),
                ("employees", pa.int64()),
                ("is_customer", pa.bool_()),
                ("topics", pa.list_(pa.string())),
            ],
        ),
    ],
)
def test_example_job(job: str, columns: list[tuple[str, pa.DataType]]) -> None:
    config = load_job(job)
    spec = spec_from_prompt(config["prompt"])
    assert spec is not None
    assert spec.columns == columns
    rows = read_csv(config["input"]["path"])
    header = list(rows[0])
    spec.check_clashes(header)
    # Every {placeholder} in the templates is an input column.
    for key in ("system", "user"):
        fields = {f for _, f, _, _ in string.Formatter().parse(config["prompt"][key]) if f}
        assert fields <= set(header), (key, fields)
    ids = [row[config["input"]["id_column"]] for row in rows]
    assert len(ids) == len(set(ids))
    assert config["model"]["max_tokens"] >= 20
    assert config["output"]["path"].startswith("data/out/")


def test_example_datasets() -> None:
    reviews = read_csv("data/reviews_sample.csv")
    assert list(reviews[0]) == ["id", "text"]
    assert 50 <= len(reviews) <= 80
    texts = [r["text"] for r in reviews]
    assert any("," in t for t in texts)
    assert any('"' in t for t in texts)
    assert any("\n" in t for t in texts)
    assert any(not t.isascii() for t in texts)
    assert all(t.strip() for t in texts)

    contacts = read_csv("data/contacts_sample.csv")
    assert list(contacts[0]) == ["id", "note"]
    assert 25 <= len(contacts) <= 40
    assert all(c["note"].strip() for c in contacts)


def test_example_datasets_read_by_pyarrow() -> None:
    from pyarrow import csv as pacsv

    options = pacsv.ParseOptions(newlines_in_values=True)
    table = pacsv.read_csv(REPO / "data" / "reviews_sample.csv", parse_options=options)
    assert table.column_names == ["id", "text"] and table.num_rows == 60
    table = pacsv.read_csv(REPO / "data" / "contacts_sample.csv", parse_options=options)
    assert table.column_names == ["id", "note"] and table.num_rows == 30


def test_extract_contacts_sent_schema_is_strict() -> None:
    spec = spec_from_prompt(load_job("extract_contacts.toml")["prompt"])
    assert spec is not None
    sent = request_fields(spec, "openrouter")["response_format"]["json_schema"]["schema"]
    assert sent["additionalProperties"] is False
    assert sent["required"] == [name for name, _ in spec.columns]
