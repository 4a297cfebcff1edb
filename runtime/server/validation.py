"""Request validation in one place: each check raises InvalidRequest naming the field and the fix.

Proto3 zero values mean "the default" (documented in generation.proto); they are turned into
`SamplingParams` here so engines only see valid, explicit values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from loraplex.runtime.engines.base import SamplingParams
from loraplex.runtime.errors import InvalidRequest

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_REQUEST_ID = 128


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
    context_length: int,
) -> SamplingParams:
    """Validated SamplingParams from wire values (0 = default)."""
    if max_new_tokens < 0:
        raise InvalidRequest(f"params.max_new_tokens is {max_new_tokens}; use 1..{context_length} (0 = default)")
    if max_new_tokens > context_length:
        raise InvalidRequest(
            f"params.max_new_tokens is {max_new_tokens}, more than the model's context length {context_length}"
        )
    _finite("params.temperature", temperature)
    if temperature < 0:
        raise InvalidRequest(f"params.temperature is {temperature}; use 0 (greedy) or a positive value")
    _finite("params.top_p", top_p)
    if not 0 <= top_p <= 1:
        raise InvalidRequest(f"params.top_p is {top_p}; use a value in (0, 1] (0 = default 1.0)")
    if top_k < 0:
        raise InvalidRequest(f"params.top_k is {top_k}; use 0 (no cut) or a positive count")
    _finite("params.repetition_penalty", repetition_penalty)
    if repetition_penalty < 0:
        raise InvalidRequest(f"params.repetition_penalty is {repetition_penalty}; use a positive value (1 = none)")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"params.stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"params.stop[{i}] must be 1..{MAX_STOP_LENGTH} characters, got {len(s)}")
    return SamplingParams(
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=float(temperature),
        top_p=float(top_p) or 1.0,
        top_k=int(top_k),
        seed=seed,
        repetition_penalty=float(repetition_penalty) or 1.0,
        stop=tuple(stop),
        ignore_eos=bool(ignore_eos),
    )


def request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID or not value.isprintable():
        raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID} printable characters")
    return value


def _finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(f"{field} is {value}; it must be a finite number")
