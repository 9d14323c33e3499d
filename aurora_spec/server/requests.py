"""From a validated request body to engine inputs: prompt ids, sampling params, learning flags."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from aurora_spec.cli import UsageError, encode_prompt
from aurora_spec.server.errors import APIError
from aurora_spec.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from aurora_spec.server.state import ServerState
from aurora_spec.types import InvalidRequestError, SamplingParams

NO_LEARN_HEADER = "x-aurora-no-learn"
DOMAIN_HEADER = "x-aurora-domain"
DOMAIN_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class EngineInputs:
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    learn: bool
    domain: str | None


def completion_prompt_ids(st: ServerState, body: CompletionRequest) -> list[int]:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one (longer batches fail validation: n=1 only)
    if isinstance(prompt, str):
        return encode_prompt(st.runtime.tokenizer, prompt, chat=False)
    vocab = st.runtime.info.vocab_size
    if any(t >= vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be < {vocab}", "prompt", "invalid_token_id")
    return list(prompt)


def chat_prompt_ids(st: ServerState, messages: list[ChatMessage]) -> list[int]:
    tokenizer = st.runtime.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions",
                       "messages", "no_chat_template")
    # "developer" is OpenAI's newer name for "system"; templates only know the old one.
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
             for m in messages]
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja raises on conversations the template refuses
        raise APIError(400, f"the chat template rejected these messages: {e}", "messages",
                       "invalid_messages") from e
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids_for(st: ServerState, body: SamplingFields) -> list[int]:
    try:
        if isinstance(body, ChatCompletionRequest):
            ids = chat_prompt_ids(st, body.messages)
        else:
            assert isinstance(body, CompletionRequest)
            ids = completion_prompt_ids(st, body)
    except UsageError as e:
        raise APIError(400, str(e), "prompt") from e
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt", "empty_prompt")
    if len(ids) >= st.capacity:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the context window holds "
                            f"{st.capacity}", "prompt", "context_length_exceeded")
    return ids


def max_tokens_for(st: ServerState, body: SamplingFields) -> int:
    limit = st.settings.max_tokens_limit
    if isinstance(body, ChatCompletionRequest):
        # Chat has no OpenAI default: generate until EOS, the limit or the context fills.
        asked = body.max_completion_tokens or body.max_tokens or limit
    else:
        asked = body.max_tokens or min(st.settings.default_max_tokens, limit)
    if asked > limit:
        raise APIError(400, f"max_tokens is {asked}; this server allows at most {limit}",
                       "max_tokens", "max_tokens_too_large")
    return asked


def sampling_for(st: ServerState, body: SamplingFields) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens_for(st, body), temperature=body.temperature,
                              top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed,
                              stop_token_ids=st.stop_ids)
    except InvalidRequestError as e:
        raise APIError(400, str(e), None, "invalid_value") from e


def learning_for(st: ServerState, body: SamplingFields, request: Request) -> bool:
    header = request.headers.get(NO_LEARN_HEADER, "").strip().lower()
    opted_out = body.aurora.no_learn or header in ("1", "true", "yes", "on")
    return st.settings.learn and not opted_out


def domain_for(body: SamplingFields, request: Request) -> str | None:
    domain = body.aurora.domain or request.headers.get(DOMAIN_HEADER)
    if domain is not None and not DOMAIN_RE.match(domain):
        raise APIError(400, "the domain tag must be 1-64 characters of A-Z a-z 0-9 _ . : -",
                       "aurora.domain", "invalid_domain")
    return domain


def engine_inputs(st: ServerState, body: SamplingFields, request: Request) -> EngineInputs:
    """Everything validated before the request takes a place in the queue."""
    st.check_model(body.model)
    params = sampling_for(st, body)
    stops = body.stop_list()
    if len(stops) > st.settings.max_stop_strings:
        raise APIError(400, f"at most {st.settings.max_stop_strings} stop strings", "stop",
                       "too_many_stop_strings")
    domain = domain_for(body, request)
    ids = prompt_ids_for(st, body)
    return EngineInputs(ids, params, stops, learning_for(st, body, request), domain)
