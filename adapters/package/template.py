"""Task prompt templates: which fields make the prompt, which make the completion.

The template is part of the package contract: the trainer renders training text with it,
the manifest records it, and the server renders `TaskInputs` through the prompt side.
Stdlib only, so the runtime can import it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass


class TemplateError(ValueError):
    """A template or a record does not fit the template; the message names which and why."""


def template_fields(text: str) -> list[str]:
    """Field names used by a `str.format` template, in order of first use."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"template {text!r} is not a valid format string: {exc}") from exc
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise TemplateError(
                f"template {text!r} has a field {{{name}}}; fields must be named, e.g. {{text}}"
            )
        if spec or conv:
            raise TemplateError(f"template {text!r}: field {{{name}}} must not carry a format spec")
        if name not in names:
            names.append(name)
    return names


@dataclass(frozen=True)
class PromptTemplate:
    """`prompt` is what the model is given; `completion` is what it must learn to produce.

    Loss is computed on the completion tokens only. At serving time only `prompt` is rendered.
    """

    prompt: str
    completion: str = ""

    def __post_init__(self) -> None:
        if not self.prompt:
            raise TemplateError("prompt template is empty")
        template_fields(self.prompt)
        template_fields(self.completion)

    @property
    def prompt_fields(self) -> list[str]:
        return template_fields(self.prompt)

    @property
    def completion_fields(self) -> list[str]:
        return template_fields(self.completion)

    def render_prompt(self, fields: Mapping[str, object], *, where: str = "input") -> str:
        return _render(self.prompt, fields, where)

    def render_completion(self, fields: Mapping[str, object], *, where: str = "input") -> str:
        return _render(self.completion, fields, where)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> PromptTemplate:
        return cls(prompt=data["prompt"], completion=data.get("completion", ""))


def _render(text: str, fields: Mapping[str, object], where: str) -> str:
    missing = [name for name in template_fields(text) if name not in fields]
    if missing:
        have = ", ".join(sorted(map(str, fields))) or "none"
        raise TemplateError(f"{where} has no field {missing[0]!r} required by template {text!r} (has: {have})")
    return text.format_map({k: str(v) for k, v in fields.items()})
