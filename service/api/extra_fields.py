"""Body fields an endpoint does not declare, the way vLLM's OpenAI server treats them, except that
nothing that changes the answer is dropped in silence.

An unknown field is ignored with a log line, as vLLM does ("fields were present in the request but
ignored"). A field OpenAI or vLLM knows and this service does not implement is refused with a 400
naming it, unless its value is one that changes nothing (clients that send every field with its
default must keep working). Once an endpoint declares a field on its request model, the field is no
longer extra and nothing here sees it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from service.errors import BadRequestError

log = logging.getLogger(__name__)

# field -> the values that leave the answer as it is (None: sent as null)
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {
    # OpenAI's
    "logit_bias": (None, {}),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    # vLLM's sampling and request extras
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "min_tokens": (None, 0),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logprob_token_ids": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "add_special_tokens": (None, False),
    "documents": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}),
    "priority": (None, 0),
    "vllm_xargs": (None,),
    "repetition_detection": (None,),
    "thinking_token_budget": (None, -1),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "prompt_embeds": (None,),
}

# known, and harmless to ignore: they change neither the tokens nor the text
HARMLESS = frozenset({
    "user", "store", "metadata", "service_tier", "request_id", "session_id", "cache_salt", "stream_interval",
    "kv_transfer_params", "ec_transfer_params", "return_token_offsets", "mm_payload", "return_mm_kwargs",
    "parallel_tool_calls", "watermarking",
})


def check_extra_fields(extra: Mapping[str, Any] | None, endpoint: str,
                       neutral: Mapping[str, tuple[Any, ...]] | None = None) -> None:
    """Refuse the known, not implemented fields that would change the answer; log the unknown ones.
    `neutral`: an endpoint's own neutral values where they differ from chat's (completions adds the
    prompt's special tokens by default)."""
    table = {**NOT_IMPLEMENTED, **(neutral or {})}
    unknown = []
    for name, value in (extra or {}).items():
        if name in table:
            if value not in table[name]:
                raise BadRequestError(f"'{name}' is not supported by this server", param=name)
        elif name not in HARMLESS:
            unknown.append(name)
    if unknown:
        log.info("%s: the following fields were present in the request but ignored: %s", endpoint, sorted(unknown)[:32])
