"""JSON a user hands the engine (scheduler configs, model metadata, pipeline.json): bounded in size, nesting depth and
string length before anything reads it, so a hostile file is one clear error, not a RecursionError or a
multi-GB allocation."""

import json
import os

MAX_JSON_BYTES = 4 << 20  # a scheduler config with 100,000 trained_betas (the most it may have) is about 2.5 MB
MAX_JSON_DEPTH = 32  # configs are flat; pipeline.json's `source` is two levels deep
MAX_JSON_STRING = 4096  # characters per key or value (PATH_MAX)


class JSONLimitError(ValueError):
    """A JSON document past one of the bounds above; the message names the document, the bound and what it has."""


def read_bounded_json(path, what):
    """The JSON value in file `path` (UTF-8), refused before reading when the file is larger than MAX_JSON_BYTES."""
    size = os.stat(path).st_size
    if size > MAX_JSON_BYTES:
        raise JSONLimitError(f"{what} is {size:,} bytes; expected at most {MAX_JSON_BYTES:,}")
    with open(path, "rb") as f:
        return parse_bounded_json(f.read(MAX_JSON_BYTES + 1).decode("utf-8"), what)


def parse_bounded_json(text, what):
    """json.loads(text) within the bounds: size, depth and every string's length (json.JSONDecodeError passes)."""
    if len(text) > MAX_JSON_BYTES:
        raise JSONLimitError(f"{what} is {len(text):,} characters; expected at most {MAX_JSON_BYTES:,}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONLimitError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    _check_shape(value, what)
    return value


def _check_shape(value, what):
    """Walk the parsed value without recursion; refuse the first container too deep or string too long."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > MAX_JSON_STRING:
                raise JSONLimitError(
                    f"{what} holds a string of {len(item):,} characters ({item[:40]!r}...); expected at most "
                    f"{MAX_JSON_STRING:,}"
                )
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise JSONLimitError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
