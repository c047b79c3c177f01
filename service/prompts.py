"""The router's prompt, shared by training (what the router learns) and serving (what it sees).

Both sides must build exactly the same token sequence, or the router is asked a question it was
never trained on; so both call `router_messages`.
"""

from __future__ import annotations

import functools
from typing import Any

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
