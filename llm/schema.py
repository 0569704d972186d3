"""Structured output for the judge: `json_schema_format(name, schema)` as `response_format`, and
`json_validator(schema)` as `validate` (parses the answer, checks a JSON-schema subset)."""

import json
import re
from typing import Any, Callable


def json_schema_format(name: str, schema: dict, strict: bool = True) -> dict:
    """`response_format` asking for JSON that matches `schema` (OpenAI structured outputs).

    Servers without it (llama-cpp-python answers HTTP 500) can use `{"type": "json_object"}` or
    none: `json_validator` checks the answer either way.
    """
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def json_validator(schema: dict) -> Callable[[str], tuple[Any, str | None]]:
    """A `validate` for `LLMClient.complete`: parse JSON (``` fences allowed) and check it against `schema`."""

    def validate(text: str):
        body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
        try:
            value = json.loads(body)
        except json.JSONDecodeError as err:
            return None, f"not_json: {err.msg} at char {err.pos}"
        problem = check_schema(value, schema)
        return (value, None) if problem is None else (None, f"schema: {problem}")

    return validate


_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def check_schema(value: Any, schema: dict, path: str = "$") -> str | None:
    """The first violation of a JSON-schema subset (type, enum, required, properties,
    additionalProperties false, items, minimum/maximum, minLength/maxLength), or None."""
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        if not any(isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool)) for t in types):
            return f"{path} should be {expected}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} should be one of {schema['enum']}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path} = {value} is below {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path} = {value} is above {schema['maximum']}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{path} is shorter than {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path} is longer than {schema['maxLength']} characters"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{path} misses {key!r}"
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                if (problem := check_schema(item, properties[key], f"{path}.{key}")) is not None:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{path} has an unexpected key {key!r}"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            if (problem := check_schema(item, schema["items"], f"{path}[{i}]")) is not None:
                return problem
    return None


# --- durable cache ---------------------------------------------------------------------------------
