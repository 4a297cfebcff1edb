"""Request validation in one place: each check raises InvalidRequest naming the field and the fix.

Proto3 zero values mean "the default" (documented in generation.proto); they are turned into
`SamplingParams` here so engines only see valid, explicit values. Ranges are chosen so that no
accepted value can make the scores non-finite: dividing float32 logits by a temperature or a
repetition penalty near zero overflows to inf, then NaN, and such a request could only fail.
Text fields must not hold NUL (a C tokenizer would silently cut the prompt there), and their size
is bounded before any tokenizing (`max_bytes`): tokenizing holds the GIL, so a huge prompt would
stall every other request and the health checks. An output constraint must compile (llguidance)
before anything is decoded.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

from loraplex.adapters.package.output import OutputConstraint, OutputSpecError
from loraplex.runtime.engines.base import SamplingParams
from loraplex.runtime.engines.guidance import check_constraint
from loraplex.runtime.engines.logprobs import MAX_TOP_LOGPROBS
from loraplex.runtime.errors import InvalidRequest, quoted

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_REQUEST_ID = 128
MAX_INPUT_FIELDS = 64
MAX_FIELD_NAME = 64
MAX_VERSION = 64
TEMPERATURE_RANGE = (0.01, 100.0)  # or 0: greedy
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # or 0: the default, 1.0 (no penalty)


# Each sampling field as the request names it: the gRPC contract's names (a front end with other
# names, such as the OpenAI HTTP API's `max_tokens`, passes its own to `sampling_params`).
GRPC_FIELDS = {name: f"params.{name}" for name in
               ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "logprobs")}
MAX_SAMPLES = 16  # `n`: samples of one prompt per request


def sampling_params(
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    repetition_penalty: float = 0.0,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    context_length: int,
    fields: Mapping[str, str] = GRPC_FIELDS,
) -> SamplingParams:
    """Validated SamplingParams from wire values (0 = default); messages name `fields`."""
    name = fields["max_new_tokens"]
    if max_new_tokens < 0:
        raise InvalidRequest(f"{name} is {max_new_tokens}; use 1..{context_length} (0 = default)", field=name)
    if max_new_tokens > context_length:
        raise InvalidRequest(
            f"{name} is {max_new_tokens}, more than the model's context length {context_length}", field=name
        )
    _in_range(fields["temperature"], temperature, TEMPERATURE_RANGE, "0 = greedy")
    name = fields["top_p"]
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        raise InvalidRequest(f"{name} is {top_p}; use a value in (0, 1] (0 = default 1.0)", field=name)
    name = fields["top_k"]
    if top_k < 0:
        raise InvalidRequest(f"{name} is {top_k}; use 0 (no cut) or a positive count", field=name)
    _in_range(fields["repetition_penalty"], repetition_penalty, REPETITION_PENALTY_RANGE, "0 = default 1.0, no penalty")
    name = fields["stop"]
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"{name} has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", field=name)
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"{name}[{i}] must be 1..{MAX_STOP_LENGTH} characters, got {len(s)}", field=name)
        text(f"{name}[{i}]", s)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        name = fields.get("logprobs", "logprobs")
        raise InvalidRequest(f"{name} is {logprobs}; use 0..{MAX_TOP_LOGPROBS} (the alternatives listed per token)",
                             field=name)
    return SamplingParams(
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=float(temperature),
        top_p=float(top_p) or 1.0,
        top_k=int(top_k),
        seed=seed,
        repetition_penalty=float(repetition_penalty) or 1.0,
        stop=tuple(stop),
        ignore_eos=bool(ignore_eos),
        logprobs=logprobs,
    )


def samples(n: int, field: str = "n") -> int:
    """How many samples of one prompt a request asks for (0 = 1)."""
    if not 0 <= n <= MAX_SAMPLES:
        raise InvalidRequest(f"{field} is {n}; use 1..{MAX_SAMPLES} (0 = 1)", field=field)
    return n or 1


def output_constraint(kind: str, spec: str | Sequence[str], field: str) -> OutputConstraint:
    """A request's output constraint (`kind` one of regex, json_schema, grammar, choice), checked to
    compile; InvalidRequest names `field` (e.g. `params.output.regex`) and the fault."""
    if isinstance(spec, str):
        text(field, spec)
    else:
        for i, choice in enumerate(spec):
            text(f"{field}[{i}]", choice)
    try:
        constraint = OutputConstraint(kind, spec if isinstance(spec, str) else tuple(spec))
    except OutputSpecError as exc:
        raise InvalidRequest(f"{field}: {exc}", field=field) from None
    return check_constraint(constraint, field)


def request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID or not value.isprintable():
        raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID} printable characters (no NUL, no newline)")
    return value


def adapter_version(value: str) -> str:
    """Load's optional version label (echoed in every response and log line)."""
    if len(value) > MAX_VERSION or not value.isprintable():
        raise InvalidRequest(f"version must be at most {MAX_VERSION} printable characters, got {quoted(value, 80)}")
    return value


def text(field: str, value: str, *, max_bytes: int | None = None) -> str:
    """A text field: no NUL character, valid Unicode and, with `max_bytes`, at most that many UTF-8 bytes.

    A lone surrogate cannot come over gRPC (protobuf checks UTF-8) but can from JSON (`"\\ud800"`):
    it is not text, and would fail wherever the text is encoded next.
    """
    nul = value.find("\0")
    if nul >= 0:
        raise InvalidRequest(f"{field} contains a NUL character (at offset {nul}); text may not hold NUL: remove it",
                             field=field)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{field} holds a lone UTF-16 surrogate (at offset {exc.start}), which is not text: "
                             "send valid Unicode", field=field) from None
    if max_bytes is not None and size > max_bytes:
        raise InvalidRequest(
            f"{field} is {size} bytes; at most {max_bytes} are accepted (the server's --max-prompt-bytes): "
            "shorten it", field=field,
        )
    return value


def prompt_input(prompt: str | None, inputs: Mapping[str, str] | None, max_bytes: int
                 ) -> tuple[str | None, dict[str, str] | None]:
    """The request's `prompt` or task `inputs`, checked before anything renders or tokenizes them."""
    if inputs is None:
        return (None if prompt is None else text("prompt", prompt, max_bytes=max_bytes)), None
    if len(inputs) > MAX_INPUT_FIELDS:
        raise InvalidRequest(f"inputs.fields has {len(inputs)} fields; at most {MAX_INPUT_FIELDS} are accepted")
    total = 0
    for key, value in inputs.items():
        if not 1 <= len(key) <= MAX_FIELD_NAME:
            raise InvalidRequest(f"inputs.fields has a field name of {len(key)} characters; use 1..{MAX_FIELD_NAME}")
        text("inputs.fields (a field name)", key)
        text(f"inputs.fields[{quoted(key)}]", value, max_bytes=max_bytes)
        total += len(value.encode("utf-8"))
    if total > max_bytes:
        raise InvalidRequest(
            f"inputs.fields hold {total} bytes; at most {max_bytes} are accepted (the server's --max-prompt-bytes)"
        )
    return None, dict(inputs)


def _in_range(field: str, value: float, bounds: tuple[float, float], zero: str) -> None:
    """0 (the default) or within `bounds`, compared as float32 (the wire type) so 0.01 is accepted."""
    low, high = bounds
    if value == 0:
        return
    if not (math.isfinite(value) and _float32(low) <= value <= _float32(high)):
        raise InvalidRequest(f"{field} is {value}; use 0 ({zero}) or a value in [{low:g}, {high:g}]", field=field)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


MAX_MIX_ADAPTERS = 4  # adapters in one mix: its rank is the sum of theirs, and every row of a step pays it
MIX_WEIGHT_RANGE = (-2.0, 2.0)  # a weight outside it is more likely a mistake than a blend


def mix(entries: Sequence[tuple[str, float]], adapter: str = "", field: str = "mix"
        ) -> tuple[tuple[str, float], ...]:
    """A request's adapter mix ((name, weight), weights as float32), checked; () when it names none.

    `adapter`: the request's single adapter, which a mix replaces (both set is refused)."""
    if not entries:
        return ()
    if adapter:
        raise InvalidRequest(f"the request names both adapter {quoted(adapter)} and a {field}; a mix replaces "
                             "the adapter: put it in the mix (with weight 1) or send one of them", field=field)
    if len(entries) > MAX_MIX_ADAPTERS:
        raise InvalidRequest(f"{field} has {len(entries)} adapters; at most {MAX_MIX_ADAPTERS} are allowed",
                             field=field)
    low, high = MIX_WEIGHT_RANGE
    seen: set[str] = set()
    out = []
    for i, (name, weight) in enumerate(entries):
        where = f"{field}[{i}]"
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"{where} names no adapter; name a loaded adapter (the base model cannot be mixed)",
                                 field=field)
        text(f"{where}.name", name)
        if name in seen:
            raise InvalidRequest(f"{where}: adapter {quoted(name)} is named twice; give it one weight", field=field)
        seen.add(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and low <= weight <= high):
            raise InvalidRequest(f"{where}.weight is {weight!r}; use a number in [{low:g}, {high:g}]", field=field)
        out.append((name, _float32(float(weight))))
    return tuple(out)
