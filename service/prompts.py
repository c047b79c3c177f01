"""Prompts: the one way messages become token ids, shared by serving, routing and training.

Training and serving must build exactly the same token sequence, or an adapter is asked a question
it was never trained on: so every prompt (a served request, the router's view of it, a training or
evaluation example) goes through `prompt_ids`, and the router's view through `router_messages`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

from service.tool_calls import CallFormat, format_calls, tools_instructions

# Short on purpose: every routing decision prefills it (its KV is cached per router, but shorter
# is still cheaper on a cache miss), and the router LoRA learns the task, not the instruction.
ROUTER_SYSTEM_PROMPT = "Name the expert for this request."


@functools.lru_cache(maxsize=8)  # per tokenizer object: training asks once per example
def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn in the base model's chat template (SmolLM2 and Qwen:
    `<|im_end|>`), read off the template itself: render a one-word answer and take the token that
    follows it. Training appends it to every answer and the router scores it after every name, so a
    name is only likely when the model would also stop there (`light` is not a prefix of `lights`).
    Falls back to the tokenizer's EOS for templates that render nothing after an answer."""
    chat = [{"role": "user", "content": "a"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    whole = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": "Zq"}], tokenize=True,
                                          return_dict=False)
    answer = tokenizer.encode("Zq", add_special_tokens=False)
    tail = list(whole[len(prompt):]) if list(whole[: len(prompt)]) == list(prompt) else []
    found = next((tail[i + len(answer)] for i in range(len(tail) - len(answer))
                  if tail[i: i + len(answer)] == answer), None)
    if found is None:
        found = tokenizer.eos_token_id
    if found is None:
        raise ValueError("the chat template marks no end of an answer and the tokenizer has no eos token")
    return int(found)


def answer_tokens(tokenizer: Any, text: str) -> list[int]:
    """The tokens of an assistant answer as training teaches it and routing scores it: the text's
    own tokens, then the end of the turn."""
    return [*tokenizer.encode(text, add_special_tokens=False), end_of_turn_id(tokenizer)]


def with_system_prompt(messages: Sequence[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """An expert trained with a system prompt gets it when the caller sends none."""
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], system_prompt: str | None = None,
               tools: Sequence[dict[str, Any]] | None = None, call_format: CallFormat = "json") -> list[int]:
    """The generation prompt of a chat: the base model's chat template with the assistant's turn
    opened, image parts left as the template's one placeholder each (engines expand them).
    `system_prompt`: the expert's own, used when the chat has none. `tools`: the OpenAI tools
    declared, and earlier assistant turns' `tool_calls`, go to the template's own tool section
    when it has one (Qwen's), else into the system turn and the assistant's text in the adapter's
    `call_format` (`chat_for_template`). A template that refuses the chat raises jinja2's
    `TemplateError` (the request path makes it a 400)."""
    chat, extra = chat_for_template(tokenizer, messages, system_prompt, tools, call_format)
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False, **extra)
    return list(ids)


def tools_to_show(tools: Sequence[dict[str, Any]] | None, tools_in_prompt: bool
                  ) -> Sequence[dict[str, Any]] | None:
    """The declared tools to render into an adapter's prompt: all of them for an adapter whose
    training prompts described tools (and for adapters trained elsewhere, as vLLM renders them), none
    for an expert trained on bare requests. Such an expert knows its tools by heart, and a block of
    schemas it never saw in training only derails it (the demo experts, trained without them: 100%
    valid calls without, 64-97% with them declared). The declared tools still decide which calls
    become `tool_calls`, and `tool_choice` still constrains the answer: only the prompt differs.
    The same rule in serving and in evaluation."""
    return tools if tools_in_prompt else None


@functools.lru_cache(maxsize=8)
def template_has_tools(tokenizer: Any) -> bool:
    """Whether the base model's chat template renders `tools` and `tool_calls` itself (Qwen's do,
    SmolLM2's does not)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), "")
    return isinstance(template, str) and "tools" in template and "tool_call" in template


def chat_for_template(tokenizer: Any, messages: Sequence[dict[str, Any]], system_prompt: str | None,
                      tools: Sequence[dict[str, Any]] | None, call_format: CallFormat = "json",
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (and keyword arguments) for `apply_chat_template`; see `prompt_ids`."""
    chat = with_system_prompt(messages, system_prompt)
    native = template_has_tools(tokenizer)
    out = []
    for message in chat:
        calls = message.get("tool_calls")
        if not calls:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
            continue
        named = [(c["function"]["name"], c["function"].get("arguments")) for c in calls]
        if native:  # templates take the arguments as an object (Qwen2.5's `| tojson` would quote a string)
            out.append({**message, "tool_calls": [
                {"type": "function", "id": c.get("id"), "function": {"name": name, "arguments": _object(args)}}
                for c, (name, args) in zip(calls, named, strict=True)]})
        else:
            text = message_text(message.get("content"))
            written = format_calls(named, call_format if call_format != "none" else "json")
            out.append({"role": message["role"], "content": f"{text}\n{written}" if text else written})
    if not tools:
        return out, {}
    if native:
        return out, {"tools": list(tools)}
    described = tools_instructions(tools, call_format if call_format != "none" else "json")
    if out and out[0].get("role") == "system":
        first = message_text(out[0].get("content"))
        out[0] = {**out[0], "content": f"{first}\n\n{described}" if first else described}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out, {}


def _object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


@functools.lru_cache(maxsize=8)
def longest_token_bytes(tokenizer: Any) -> int:
    """The most text bytes one token of this vocabulary can stand for: each entry decoded alone (a
    partial UTF-8 byte decodes to the 3-byte replacement character, never to less than it stands
    for), plus one for a decoder that drops a word-start space. A text of `n` bytes therefore takes
    at least `n // longest_token_bytes` tokens: enough to refuse a megabyte of prompt without
    tokenizing it on the event loop (SmolLM2: 81 bytes, for a run of 80 spaces)."""
    if not hasattr(tokenizer, "get_vocab"):
        return sys.maxsize  # no vocabulary to read: the bound is 0 and the real count decides alone
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is not None:
        def spelled(token: str) -> str:
            return decoder.decode([token])
    else:
        def spelled(token: str) -> str:
            return tokenizer.convert_tokens_to_string([token])
    return 1 + max((len(spelled(token).encode()) for token in tokenizer.get_vocab()), default=0)


def fewest_prompt_tokens(tokenizer: Any, messages: Sequence[dict[str, Any]],
                         tools: Sequence[dict[str, Any]] | None = None) -> int:
    """A lower bound on the tokens `prompt_ids` would give for these messages' text (and the tools'
    schemas, and earlier calls), in microseconds."""
    text_bytes = sum(len(message_text(m.get("content")).encode()) for m in messages)
    text_bytes += sum(len(json.dumps(m["tool_calls"], ensure_ascii=False).encode()) // 2
                      for m in messages if m.get("tool_calls"))  # the JSON keys are not all rendered
    text_bytes += len(json.dumps(list(tools or ()), ensure_ascii=False).encode()) // 2
    return text_bytes // longest_token_bytes(tokenizer)


def message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or OpenAI content parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return "" if content is None else str(content)


def is_image_part(part: Any) -> bool:
    """An image content part as chat templates see it: `{"type": "image", "image": <image or path>}`."""
    return isinstance(part, dict) and part.get("type") == "image"


def router_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The router sees its own system prompt and the conversation's last user turn: its text, and
    its images when it has any (a screenshot can decide the expert as much as the words)."""
    user_turns = [m for m in messages if m.get("role") == "user"]
    content = user_turns[-1]["content"] if user_turns else ""
    last: Any = message_text(content)
    if isinstance(content, list) and any(is_image_part(p) for p in content):
        last = [p for p in content if is_image_part(p) or (isinstance(p, dict) and p.get("type") == "text")]
    return [
        {"role": "system", "content": ROUTER_SYSTEM_PROMPT},
        {"role": "user", "content": last},
    ]
