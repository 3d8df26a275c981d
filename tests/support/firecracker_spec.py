"""Firecracker's own API description as a checker: :class:`SpecValidator` validates a
request (method, path, body) against the Swagger file in ``../shared/firecracker``, with
required fields enforced and ``additionalProperties: false`` added so that a field the
spec does not define fails."""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft4Validator  # type: ignore[import-untyped]

from tests.support.paths import REPO

SPEC_DIR = REPO.parent / "shared" / "firecracker"
SPECS = sorted(SPEC_DIR.glob("firecracker-api-v*.yaml"))
needs_spec = pytest.mark.skipif(
    not SPECS,
    reason=f"Firecracker API spec not found (expected {SPEC_DIR}/firecracker-api-v*.yaml)",
)


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class SpecValidator:
    """Checks (method, path, body) against a Swagger 2.0 document."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.definitions = strict(spec["definitions"])
        self.paths: dict[str, dict[str, Any]] = spec["paths"]

    def _match(self, path: str) -> tuple[str, dict[str, str]] | None:
        for template in self.paths:
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            found = re.fullmatch(pattern, path)
            if found:
                return template, found.groupdict()
        return None

    def errors(self, method: str, path: str, body: Any) -> list[str]:
        matched = self._match(path)
        if matched is None:
            return [f"{path}: no such path in the spec"]
        template, params = matched
        operation = self.paths[template].get(method.lower())
        if operation is None:
            return [f"{method} {template}: method not in the spec"]
        body_params = [p for p in operation.get("parameters", []) if p["in"] == "body"]
        if not body_params:
            return [] if body is None else [f"{method} {template}: takes no body"]
        if body is None:
            return [f"{method} {template}: body required"] if body_params[0].get("required") else []
        schema = {"definitions": self.definitions, **body_params[0]["schema"]}
        found = [
            f"{method} {path} {'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
            for e in Draft4Validator(schema).iter_errors(body)
        ]
        # Firecracker also insists that ids in the path and in the body agree.
        for name, value in params.items():
            if isinstance(body, dict) and name in body and body[name] != value:
                found.append(f"{method} {path}: {name} {body[name]!r} differs from the path")
        return found


def assert_valid(validator: SpecValidator, requests: list[dict[str, Any]]) -> None:
    """Fails listing every way in which ``requests`` (as recorded) break the spec."""
    problems = [e for r in requests for e in validator.errors(r["method"], r["path"], r["body"])]
    assert not problems, "\n".join(problems)
