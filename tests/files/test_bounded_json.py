"""Bounded JSON: documents within the bounds read exactly as json.loads reads them; past a bound, one clear error."""

import json

import pytest

from ddengine.files.bounded_json import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_JSON_STRING,
    JSONLimitError,
    parse_bounded_json,
    read_bounded_json,
)


def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "text",
    [
        '{"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "clip_sample": true}',
        json.dumps({"trained_betas": [1e-4 + i * 1e-7 for i in range(100_000)]}),  # the largest schedule allowed
        nested(MAX_JSON_DEPTH),
        json.dumps({"k" * MAX_JSON_STRING: "v" * MAX_JSON_STRING}),
    ],
)
def test_documents_within_the_bounds_read_as_json_loads_reads_them(text):
    assert parse_bounded_json(text, "doc") == json.loads(text)


@pytest.mark.parametrize(
    "text, message",
    [
        (nested(MAX_JSON_DEPTH + 1), "doc is nested more than 32 levels deep"),
        (nested(100_000), "doc is nested more than 32 levels deep"),  # past the interpreter's recursion limit
        (json.dumps({"a": [{"b": "x" * (MAX_JSON_STRING + 1)}]}), "doc holds a string of 4,097 characters"),
        (json.dumps({"k" * (MAX_JSON_STRING + 1): 1}), "doc holds a string of 4,097 characters"),
        (" " * (MAX_JSON_BYTES + 1), "doc is 4,194,305 characters; expected at most 4,194,304"),
    ],
)
def test_past_a_bound_is_one_error_naming_it(text, message):
    with pytest.raises(JSONLimitError, match=message):
        parse_bounded_json(text, "doc")


def test_a_file_too_large_is_refused_before_it_is_read(tmp_path, monkeypatch):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB that reading whole would allocate
    monkeypatch.setattr("builtins.open", None)  # any read would fail with a TypeError, not the size error
    with pytest.raises(JSONLimitError, match=r"big is 2,147,483,648 bytes; expected at most 4,194,304"):
        read_bounded_json(big, "big")


def test_bad_json_is_still_a_json_decode_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": ')
    with pytest.raises(json.JSONDecodeError):
        read_bounded_json(path, "c")
