"""Whether a request's JSON schema (`response_format`, a tool's parameters) is valid JSON
Schema, before any grammar is compiled from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_json_schema(schema: Mapping[str, Any]) -> None:
    """Raise `ValueError` (a 400 naming the field, in a request model) unless `schema` is
    valid JSON Schema (the draft it names, 2020-12 otherwise)."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    validator: Any = validator_for(schema)
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        place = "/".join(str(part) for part in exc.path)
        raise ValueError(f"not valid JSON Schema at '{place}': {exc.message}") from None
