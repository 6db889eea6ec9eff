"""Pydantic's validation errors as one `InvalidRequestError` that names the field, what it allows (from
the field's declared constraints, as /docs.json publishes them) and what was given. Shared by the request
model, Settings, the trainer's config and the HTTP bodies."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from spo_runtime.errors import InvalidRequestError
from spo_runtime.limits import ADAPTER_NAME_RULE


_TYPES = {"int": "an integer", "float": "a number", "str": "a string", "string": "a string", "bool": "true or false",
          "dict": "a JSON object", "list": "a list", "literal": "one of the listed values"}
_PATTERN_RULES = {"prompt": "must be a non-empty string (not only whitespace) without control characters (tab and "
                            "newline are allowed)",
                  "negative_prompt": "must not hold control characters (tab and newline are allowed)", "adapter": f"must be {ADAPTER_NAME_RULE}",
                  "device": "must be cpu, cuda, cuda:N or mps", "train_device": "must be cpu, cuda, cuda:N or mps"}


def allowed(model: type[BaseModel], name: str) -> str:
    """The allowed values of a field, in words, from its declared constraints (what /docs.json says)."""
    f = model.model_fields.get(name)
    if f is None:
        return ""
    c: dict[str, Any] = {}
    for m in f.metadata:
        for key in ("ge", "le", "gt", "lt", "multiple_of", "min_length", "max_length"):
            if getattr(m, key, None) is not None:
                c[key] = getattr(m, key)
    args = getattr(f.annotation, "__args__", ())
    literal = [a for a in args if getattr(a, "__origin__", None) is Literal] or (
        [f.annotation] if getattr(f.annotation, "__origin__", None) is Literal else [])
    if literal:
        return "one of " + ", ".join(map(str, literal[0].__args__))
    if "ge" in c or "gt" in c:
        lo = c.get("ge", c.get("gt"))
        hi = c.get("le", c.get("lt"))
        if hi is None:
            return f"> {lo}" if "gt" in c else f">= {lo}"
        rng = f"({lo}, {hi}]" if "gt" in c else f"{lo}..{hi}"
        return f"a multiple of {c['multiple_of']} in {rng}" if "multiple_of" in c else f"in {rng}"
    if "max_length" in c:
        return f"{c.get('min_length', 0)}..{c['max_length']} characters"
    if "min_length" in c:
        return f"at least {c['min_length']} characters"
    return ""


def validation_error(e: ValidationError, model: type[BaseModel] | None = None) -> InvalidRequestError:
    """Pydantic's errors -> one InvalidRequestError naming the first field, every problem in `.errors`.
    Each message says what is allowed (the field's declared range or values) and what was given."""
    problems = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        name = str(err["loc"][0]) if err["loc"] else ""
        kind, got = err["type"], err.get("input")
        rule = allowed(model, name) if model is not None else ""
        if isinstance(got, (int, float, str, bool)) and len(repr(got)) < 80:
            shown = f"got {got!r}"
        else:
            shown = f"got {len(got)} characters" if isinstance(got, str) else f"got {type(got).__name__}"
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "field required"
        elif not err["loc"] and model is not None and re.match(r"^\w+: ", msg := err["msg"].removeprefix("Value error, ")) \
                and msg.split(":")[0] in model.model_fields:
            loc, msg = msg.split(": ", 1)  # a model-level check names its field as "field: ..."
        elif kind == "model_type" or (kind == "dict_type" and not err["loc"]):
            loc, msg = "body", "must be a JSON object"
        elif kind == "json_invalid":
            loc, msg = "body", f"must be JSON ({err.get('ctx', {}).get('error', err['msg'])})"
        elif kind == "string_pattern_mismatch" and name in _PATTERN_RULES:
            msg = _PATTERN_RULES[name]
        elif kind.endswith("_type") or kind.endswith("_parsing") or kind == "finite_number":
            what = _TYPES.get(kind.split("_")[0], kind.removesuffix("_type"))
            if kind == "finite_number":
                what = "a finite number"
            msg = f"must be {what}" + (f" {rule}" if rule and not rule.startswith("one of") else "") + f", {shown}"
        elif kind == "literal_error" or kind == "enum":
            msg = f"must be {rule or err['msg']}, {shown}"
        elif rule and kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "multiple_of",
                               "string_too_long", "string_too_short"):
            msg = f"must be {rule}, {shown}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        problems.append((loc, msg))
    return invalid(problems)


def invalid(problems: list[tuple[str, str]]) -> InvalidRequestError:
    """(field, message) pairs -> one InvalidRequestError naming the first field, every problem in `.errors`."""
    first, rest = problems[0], problems[1:]
    out = InvalidRequestError(first[0], first[1] + "".join(f"; {f}: {m}" for f, m in rest))
    out.errors = problems
    return out
