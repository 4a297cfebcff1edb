"""A task's output contract: what every completion must match, enforced while decoding.

One of four kinds, as a request sends it and as the manifest records a task's default:
- `regex`: the completion matches the regular expression in full;
- `json_schema`: the completion is one JSON value that validates against the schema (whitespace
  between tokens is fixed unless the schema's `x-guidance` says otherwise: a model would otherwise
  be free to emit whitespace until the length limit);
- `grammar`: a Lark grammar (llguidance's dialect; `start` is the top rule);
- `choice`: exactly one of a list of strings.

Every kind becomes one of the forms the engines take (`guidance()`: onnxruntime-genai's
`set_guidance` kinds `regex`, `json_schema`, `lark_grammar`), so both engines enforce the same
language. Stdlib only: checking that a spec compiles is the runtime's (`runtime/engines/guidance.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("regex", "json_schema", "grammar", "choice")
MAX_SPEC_CHARS = 64 * 1024  # a regex, schema or grammar
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024
# Compact JSON: no whitespace between tokens (onnxruntime-genai's default lets a model emit
# whitespace without bound). A schema's own `x-guidance` takes precedence.
JSON_DEFAULTS = {"whitespace_flexible": False}


class OutputSpecError(ValueError):
    """A constraint that is malformed (unknown kind, wrong type, empty, too large); says which."""


@dataclass(frozen=True)
class OutputConstraint:
    kind: str  # one of KINDS
    spec: str | tuple[str, ...]  # the regex / schema (JSON text) / grammar; the choices for `choice`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OutputSpecError(f"output kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.kind == "choice":
            if isinstance(self.spec, str) or not isinstance(self.spec, (tuple, list)):
                raise OutputSpecError("a choice constraint takes a list of strings")
            choices = tuple(self.spec)
            if not choices or len(choices) > MAX_CHOICES:
                raise OutputSpecError(f"a choice constraint takes 1..{MAX_CHOICES} strings, got {len(choices)}")
            for i, c in enumerate(choices):
                if not isinstance(c, str) or not 1 <= len(c) <= MAX_CHOICE_CHARS:
                    raise OutputSpecError(f"choice [{i}] must be a string of 1..{MAX_CHOICE_CHARS} characters")
            object.__setattr__(self, "spec", choices)
        else:
            if not isinstance(self.spec, str) or not self.spec:
                raise OutputSpecError(f"a {self.kind} constraint takes a non-empty string")
            if len(self.spec) > MAX_SPEC_CHARS:
                raise OutputSpecError(f"the {self.kind} is {len(self.spec)} characters; at most {MAX_SPEC_CHARS}")
            if self.kind == "json_schema":
                _schema_object(self.spec)

    def guidance(self) -> tuple[str, str]:
        """(kind, data) in onnxruntime-genai's `set_guidance` terms, which llguidance also reads."""
        if self.kind == "regex":
            return "regex", str(self.spec)
        if self.kind == "grammar":
            return "lark_grammar", str(self.spec)
        if self.kind == "choice":
            # JSON string literals are Lark string literals (escapes included).
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.spec)
            return "lark_grammar", f"start: {alternatives}\n"
        schema = _schema_object(str(self.spec))
        schema.setdefault("x-guidance", dict(JSON_DEFAULTS))
        return "json_schema", json.dumps(schema)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": list(self.spec) if self.kind == "choice" else self.spec}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputConstraint:
        """From `{kind, spec}` (a manifest entry, a tasks.yaml `output:`); a JSON schema may be an object."""
        if not isinstance(data, dict) or "kind" not in data or "spec" not in data:
            raise OutputSpecError("an output contract is a mapping with `kind` and `spec`")
        spec = data["spec"]
        if data["kind"] == "json_schema" and isinstance(spec, dict):
            spec = json.dumps(spec)
        return cls(str(data["kind"]), tuple(spec) if isinstance(spec, list) else spec)

    def describe(self, limit: int = 120) -> str:
        text = json.dumps(list(self.spec)) if self.kind == "choice" else str(self.spec)
        return f"{self.kind} {text[:limit]}{'...' if len(text) > limit else ''}"


def _schema_object(text: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputSpecError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise OutputSpecError(f"a JSON schema is an object, not a {type(schema).__name__}")
    return schema
