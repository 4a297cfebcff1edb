"""OpenAI request bodies -> `GenerationRequest`, and the request path's events -> OpenAI responses.

Translation only: what a field means is decided by the request layer (`GenerationService`) and
checked by `loraplex.runtime.server.validation`, as on the gRPC port; this module maps names and
shapes. Every field of a body is accounted for: a field loraplex serves is used; an OpenAI field it
does not serve (`tools`, penalties, `best_of`, ...) is accepted only with the value that changes
nothing and otherwise refused with 400 naming it; a field no endpoint knows is refused. `null` means
"not given", as in OpenAI's API.

Scores: `logprobs` (completions: the count of alternatives, 0..20; chat: true, with `top_logprobs`
0..20) gives each token's log-probability in OpenAI's shapes, streamed too, from the distribution the
token is chosen from (the model's, after the repetition penalty and the output constraint, before
temperature, top-k and top-p). `n` (1..16) returns that many samples (sample i with seed `seed + i`).

OpenAI's defaults, not gRPC's: `temperature` 1.0 (sampling; send 0 for greedy), `max_tokens` 16 on
/v1/completions and "until EOS or the context is full" on /v1/chat/completions. Extensions (the
names vLLM uses, so the same client code works): `top_k`, `repetition_penalty`, `ignore_eos`, and
loraplex's `inputs` on /v1/completions: task fields rendered through the adapter's template.

Structured output: `response_format` {"type": "json_schema", "json_schema": {"schema": ...}} or
{"type": "json_object"} constrains the completion as the gRPC `params.output.json_schema` does;
{"type": "text"} asks for free text (no constraint, not even the adapter's default); without it the
adapter's default output contract applies. vLLM's extensions `guided_regex`, `guided_choice`,
`guided_grammar` and `guided_json` set the other kinds (at most one constraint per request).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from loraplex.runtime.engines.base import FinishReason, TokenLogprobs
from loraplex.runtime.errors import InvalidRequest, quoted
from loraplex.runtime.server.generation import GenerationRequest, GenerationResult
from loraplex.runtime.server.request_state import Finished, Started
from loraplex.runtime.server.validation import MAX_SAMPLES, mix, output_constraint, sampling_params, text

Kind = Literal["completion", "chat"]

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_SEED = 2**64  # the gRPC contract's uint64
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop",
                  FinishReason.CANCELLED: "cancelled"}
OPENAI_FIELDS = {  # OpenAI's names -> the request layer's, for validation's messages
    "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "repetition_penalty": "repetition_penalty", "stop": "stop", "logprobs": "logprobs",
}


def _same(value: Any, *allowed: Any) -> bool:
    """`value` is one of `allowed`, type included (JSON true is not 1)."""
    return any(value is a or (type(value) is type(a) and value == a) for a in allowed)


# OpenAI fields loraplex does not serve: accepted only with a value that changes nothing.
NO_OP = Callable[[Any], bool]
COMMON_UNSUPPORTED: dict[str, tuple[NO_OP, str]] = {
    "presence_penalty": (lambda v: _same(v, 0, 0.0), "use the `repetition_penalty` extension"),
    "frequency_penalty": (lambda v: _same(v, 0, 0.0), "use the `repetition_penalty` extension"),
    "logit_bias": (lambda v: _same(v, {}), "loraplex does not bias logits"),
}
UNSUPPORTED: dict[Kind, dict[str, tuple[NO_OP, str]]] = {
    "completion": {
        **COMMON_UNSUPPORTED,
        "best_of": (lambda v: _same(v, 1), "loraplex decodes one sequence per request"),
        "echo": (lambda v: _same(v, False), "loraplex returns the completion only"),
        "suffix": (lambda v: _same(v, ""), "loraplex does not insert text"),
    },
    "chat": {
        **COMMON_UNSUPPORTED,
        "tools": (lambda v: _same(v, []), "loraplex does not call tools"),
        "tool_choice": (lambda v: _same(v, "none"), "loraplex does not call tools"),
        "parallel_tool_calls": (lambda v: isinstance(v, bool), "loraplex does not call tools"),
        "functions": (lambda v: _same(v, []), "loraplex does not call functions"),
        "function_call": (lambda v: _same(v, "none"), "loraplex does not call functions"),
        "store": (lambda v: _same(v, False), "loraplex stores nothing"),
        "metadata": (lambda v: _same(v, {}), "loraplex stores nothing"),
        "modalities": (lambda v: _same(v, ["text"]), "loraplex serves text only"),
        "service_tier": (lambda v: _same(v, "auto", "default"), "loraplex has one service tier"),
        "audio": (lambda v: False, "loraplex serves text only"),
        "prediction": (lambda v: False, "loraplex does not take predicted outputs"),
        "reasoning_effort": (lambda v: False, "loraplex does not reason on request"),
        "web_search_options": (lambda v: False, "loraplex does not search the web"),
    },
}
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop", "top_k", "repetition_penalty", "ignore_eos",
            "response_format", "guided_regex", "guided_choice", "guided_grammar", "guided_json")
GUIDED = {"guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar", "guided_json": "json_schema"}
SERVED: dict[Kind, tuple[str, ...]] = {
    "completion": ("model", "prompt", "inputs", "stream", "stream_options", "user", "n", "logprobs", "mix",
                   *SAMPLING),
    "chat": ("model", "messages", "max_completion_tokens", "stream", "stream_options", "user", "n", "logprobs",
             "top_logprobs", "mix", *SAMPLING),
}
ENDPOINTS: dict[Kind, str] = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class OpenAICall:
    """One OpenAI request as the request layer will run it."""

    kind: Kind
    model: str  # as the client named it, echoed in the response
    request: GenerationRequest  # `adapter` is resolved by the front end; chat's prompt too
    messages: list[dict[str, str]] | None = None  # chat: rendered through the chat template into the prompt
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1  # samples (choices)

    @property
    def id(self) -> str:
        return ("cmpl-" if self.kind == "completion" else "chatcmpl-") + self.request.request_id


# -- requests ---------------------------------------------------------------------------------
def parse_call(kind: Kind, body: Any, *, context_length: int, max_prompt_bytes: int, request_id: str) -> OpenAICall:
    """A checked `OpenAICall` from a decoded JSON body; InvalidRequest names the field at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {_json_type(body)}")
    given = {k: v for k, v in body.items() if v is not None}
    _refuse_unserved(kind, given)
    model = _string(given, "model", required=True)
    text("model", model)
    stream = _boolean(given, "stream", False)
    options = given.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest("stream_options is only allowed with stream: true", field="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidRequest("stream_options may hold `include_usage` only", field="stream_options")
        include_usage = _boolean(options, "include_usage", False, where="stream_options.")
    _string(given, "user")  # an end-user id for the caller's own records: no effect on the output
    request = GenerationRequest(params=_sampling(kind, given, context_length), request_id=request_id)
    request.params, request.default_output = _output(given, request.params)
    request.mix = _mix(given)
    n = _integer(given, "n")
    if n is not None and not 1 <= n <= MAX_SAMPLES:
        raise InvalidRequest(f"n is {n}; use 1..{MAX_SAMPLES}", field="n")
    call = OpenAICall(kind, model, request, stream=stream, include_usage=include_usage, n=n or 1)
    if kind == "chat":
        call.messages = _messages(given, max_prompt_bytes)
    else:
        request.prompt, request.inputs = prompt_or_inputs(given)
    return call


def _mix(given: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """The extension field `mix`: [{"adapter": name, "weight": number}, ...] (`model` is then the base model's id)."""
    value = given.get("mix")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(e, dict) and set(e) == {"adapter", "weight"} for e in value):
        raise InvalidRequest('mix must be a list of {"adapter": name, "weight": number} objects', field="mix")
    return mix([(e["adapter"], e["weight"]) for e in value])


def _refuse_unserved(kind: Kind, given: Mapping[str, Any]) -> None:
    unsupported = UNSUPPORTED[kind]
    for name, value in given.items():
        if name in SERVED[kind]:
            continue
        if name in unsupported:
            no_op, why = unsupported[name]
            if not no_op(value):
                raise InvalidRequest(f"{name}={_short_json(value)} is not supported: {why}", field=name)
            continue
        other = next((k for k in SERVED if k != kind and name in SERVED[k]), None)
        hint = f" (it belongs to {ENDPOINTS[other]})" if other else ""
        raise InvalidRequest(f"unknown field {quoted(name, 64)} for {ENDPOINTS[kind]}{hint}; remove it", field=name)


def _sampling(kind: Kind, given: Mapping[str, Any], context_length: int):
    names = dict(OPENAI_FIELDS)
    max_tokens = _integer(given, "max_tokens")
    if kind == "chat" and "max_completion_tokens" in given:
        newer = _integer(given, "max_completion_tokens")
        if max_tokens is not None and newer != max_tokens:
            raise InvalidRequest("max_tokens and max_completion_tokens differ; send one of them",
                                 field="max_completion_tokens")
        max_tokens, names["max_new_tokens"] = newer, "max_completion_tokens"
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if kind == "completion" else context_length
    elif max_tokens < 1:
        name = names["max_new_tokens"]
        raise InvalidRequest(f"{name} is {max_tokens}; use 1..{context_length}", field=name)
    top_p = _number(given, "top_p", 1.0)
    if top_p == 0:
        raise InvalidRequest("top_p is 0; use a value in (0, 1]", field="top_p")
    seed = _integer(given, "seed")
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise InvalidRequest(f"seed is {seed}; use an integer in [0, 2**64)", field="seed")
    return sampling_params(
        max_new_tokens=max_tokens,
        temperature=_number(given, "temperature", 1.0),
        top_p=top_p,
        top_k=_integer(given, "top_k") or 0,
        seed=seed,
        repetition_penalty=_number(given, "repetition_penalty", 1.0),
        stop=_stop(given),
        ignore_eos=_boolean(given, "ignore_eos", False),
        logprobs=_logprobs(kind, given, names),
        context_length=context_length,
        fields=names,
    )


def _logprobs(kind: Kind, given: Mapping[str, Any], names: dict[str, str]) -> int | None:
    """The alternatives per token asked for (None: no log-probabilities)."""
    if kind == "completion":
        return _integer(given, "logprobs")
    top = _integer(given, "top_logprobs")
    if not _boolean(given, "logprobs", False):
        if top:  # 0 without logprobs changes nothing
            raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
        return None
    names["logprobs"] = "top_logprobs"
    return top or 0


def _output(given: Mapping[str, Any], params: Any) -> tuple[Any, bool]:
    """(params with the request's output constraint, whether the adapter's default applies)."""
    named = [name for name in ("response_format", *GUIDED) if name in given]
    if len(named) > 1:
        raise InvalidRequest(f"{' and '.join(named)} both constrain the output; send one of them", field=named[1])
    if not named:
        return params, True
    name = named[0]
    value = given[name]
    if name == "response_format":
        if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidRequest("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                 "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}", field=name)
        if value["type"] == "text":
            return params, False
        schema: Any = {"type": "object"}
        if value["type"] == "json_schema":
            inner = value.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                                     field="response_format")
        spec: Any = json.dumps(schema)
        kind, where = "json_schema", "response_format"
    else:
        kind, where, spec = GUIDED[name], name, value
        if kind == "json_schema" and isinstance(value, dict):
            spec = json.dumps(value)
        elif kind == "choice":
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise InvalidRequest(f"{name} must be a list of strings", field=name)
        elif not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string", field=name)
    try:
        constraint = output_constraint(kind, spec, where)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc), field=name) from None
    return replace(params, constraint=constraint), True


def prompt_or_inputs(given: Mapping[str, Any]) -> tuple[str | None, dict[str, str] | None]:
    prompt = given.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI's list form, one prompt
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string (or a list of one string; token ids are not accepted): "
                             "send n requests for n prompts", field="prompt")
    inputs = given.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
            raise InvalidRequest("inputs must be an object of string fields, e.g. {\"text\": \"...\"}", field="inputs")
        if prompt:
            raise InvalidRequest("send either prompt or inputs (rendered through the adapter's template), not both",
                                 field="inputs")
        return None, dict(inputs)
    if not prompt:
        raise InvalidRequest("prompt is missing or empty; send a prompt (or the `inputs` of the adapter's task)",
                             field="prompt")
    return prompt, None


def _messages(given: Mapping[str, Any], max_bytes: int) -> list[dict[str, str]]:
    messages = given.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}", field="messages")
    out, total = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object {{role, content}}", field="messages")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InvalidRequest(f"{where}.{quoted(extra[0], 64)} is not supported: a message holds role and "
                                 "content only (loraplex has no tools or names)", field="messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(f"{where}.role is {quoted(_short_json(role), 64)}; use one of "
                                 f"{', '.join(CHAT_ROLES)} (loraplex has no tools)", field="messages")
        content = _content(message.get("content"), where)
        total += len(content.encode("utf-8"))
        out.append({"role": CHAT_ROLES[role], "content": content})
    if total > max_bytes:
        raise InvalidRequest(f"messages hold {total} bytes of content; at most {max_bytes} are accepted (the "
                             "server's --max-prompt-bytes)", field="messages")
    return out


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                                     "(loraplex serves text only)", field="messages")
            parts.append(part["text"])
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string or a list of text parts", field="messages")
    return text(f"{where}.content", content)


def _stop(given: Mapping[str, Any]) -> list[str]:
    stop = given.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise InvalidRequest("stop must be a string or a list of strings", field="stop")


def _integer(given: Mapping[str, Any], name: str) -> int | None:
    value = given.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest(f"{name} must be an integer, not {_json_type(value)}", field=name)
    return value


def _number(given: Mapping[str, Any], name: str, default: float) -> float:
    value = given.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number, not {_json_type(value)}", field=name)
    return float(value)


def _boolean(given: Mapping[str, Any], name: str, default: bool, where: str = "") -> bool:
    value = given.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where}{name} must be true or false, not {_json_type(value)}", field=where + name)
    return value


def _string(given: Mapping[str, Any], name: str, required: bool = False) -> str | None:
    value = given.get(name)
    if value is None and required:
        raise InvalidRequest(f"{name} is missing; GET /v1/models lists the ids to send", field=name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {_json_type(value)}", field=name)
    return value


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _short_json(value: Any, limit: int = 80) -> str:
    """A value as JSON, cut to `limit` characters (an error message quotes at most that much)."""
    out = json.dumps(value)
    return out if len(out) <= limit else out[:limit] + "..."


# -- responses --------------------------------------------------------------------------------
def usage(finished: Finished, completion_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's usage; `completion_tokens`: of every sample (default: this one's)."""
    completion = finished.completion_tokens if completion_tokens is None else completion_tokens
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": completion,
            "total_tokens": finished.prompt_tokens + completion}


def extension(started: Started, finished: Finished | None) -> dict[str, Any]:
    """loraplex's own fields beside OpenAI's (clients keep unknown fields): what served the request."""
    info: dict[str, Any] = {"adapter": started.adapter, "adapter_version": started.adapter_version,
                            "request_id": started.request_id}
    if finished is not None:
        t = finished.timings
        info["timings"] = {"queue_ms": t.queue_ms, "time_to_first_token_ms": t.time_to_first_token_ms,
                           "total_ms": t.total_ms}
    return info


TokenBytes = Callable[[int], bytes]  # one token's own bytes (the server tokenizer's `token_bytes`)


def logprobs_json(call: OpenAICall, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs],
                  token_bytes: TokenBytes, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's `logprobs` of a choice (or of a chunk's tokens), or None when not asked for. Completions:
    `tokens`, `token_logprobs`, `top_logprobs` ({token: logprob}), `text_offset` (from `offset`, in
    characters of the completion); chat: `content`, a list of {token, logprob, bytes, top_logprobs}."""
    if call.request.params.logprobs is None:
        return None

    def text(token: int) -> str:
        return token_bytes(token).decode("utf-8", errors="replace")

    pairs = list(zip(token_ids, logprobs, strict=False))
    if call.kind == "chat":
        return {"content": [{"token": text(t), "logprob": lp.logprob, "bytes": list(token_bytes(t)),
                             "top_logprobs": [{"token": text(a), "logprob": v, "bytes": list(token_bytes(a))}
                                              for a, v in lp.top]} for t, lp in pairs],
                "refusal": None}
    offsets, tops = [], []
    for t, lp in pairs:
        offsets.append(offset)
        offset += len(text(t))
        top: dict[str, float] = {}
        for a, v in lp.top:  # tokens that read alike (parts of one character) keep the most likely
            top.setdefault(text(a), v)
        tops.append(top)
    return {"tokens": [text(t) for t, _ in pairs], "token_logprobs": [lp.logprob for _, lp in pairs],
            "top_logprobs": tops, "text_offset": offsets}


def response(call: OpenAICall, results: Sequence[GenerationResult], token_bytes: TokenBytes) -> dict[str, Any]:
    """The whole (non-streaming) response: one choice per sample."""
    choices = []
    for index, result in enumerate(results):
        reason = FINISH_REASONS[result.finished.reason]
        scores = logprobs_json(call, result.token_ids, result.logprobs, token_bytes)
        if call.kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": result.text},
                            "logprobs": scores, "finish_reason": reason})
        else:
            choices.append({"index": index, "text": result.text, "logprobs": scores, "finish_reason": reason})
    first = results[0]
    return {"id": call.id, "object": "chat.completion" if call.kind == "chat" else "text_completion",
            "created": call.created, "model": call.model, "choices": choices,
            "usage": usage(first.finished, sum(r.finished.completion_tokens for r in results)),
            "loraplex": extension(first.started, first.finished)}


def chunk(call: OpenAICall, piece: str | None = None, finished: Finished | None = None, *,
          role: bool = False, index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk of choice `index`: a text piece (and its tokens' `logprobs`), the assistant's
    role (chat's first chunk) or the finish reason."""
    reason = FINISH_REASONS[finished.reason] if finished is not None else None
    if call.kind == "chat":
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if piece:
            delta["content"] = piece
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": piece or "", "logprobs": logprobs, "finish_reason": reason}
    out = {"id": call.id, "object": "chat.completion.chunk" if call.kind == "chat" else "text_completion",
           "created": call.created, "model": call.model, "choices": [choice]}
    if call.include_usage:
        out["usage"] = None
    return out


def usage_chunk(call: OpenAICall, started: Started, finished: Finished, completion_tokens: int | None = None
                ) -> dict[str, Any]:
    """The last chunk with stream_options.include_usage: no choices, the usage (OpenAI's shape)."""
    out = chunk(call)
    out["choices"] = []
    out["usage"] = usage(finished, completion_tokens)
    out["loraplex"] = extension(started, finished)
    return out


def model_card(model_id: str, created: int, *, version: str, parent: str | None = None,
               fields: Sequence[str] = (), output: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of GET /v1/models: OpenAI's fields, vLLM's `root`/`parent` for an adapter, loraplex's
    `version` (the adapter version that serves new requests), `inputs` (its template's fields) and
    `output` (its default output contract, {kind, spec})."""
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": "loraplex",
                            "root": parent or model_id, "parent": parent, "version": version}
    if fields:
        card["inputs"] = list(fields)
    if output:
        card["output"] = output
    return card
