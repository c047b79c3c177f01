"""Scoring candidate continuations on a transformers model: the prompt and the names' prefix tree.

Routing asks for the total log-probability of every candidate name (its tokens and the end-of-turn
token) after the router's prompt. Scoring each name with a forward pass of its own costs one
prefill per name. `packed_logprobs` (text prompts) runs one forward over the prompt's tokens
followed by every node of the candidates' prefix tree, each node once, with an attention mask that
lets a node see the prompt and its own ancestors only (tree attention, as in speculative decoding's
token trees): 64 names `expert-00`..`expert-63` cost 73 extra positions there, against 256 in one
row per name, and no second forward. `continuation_logprobs` (prompts with images, whose MRoPE
positions the tree mask does not model) shares the prompt's prefilled KV (not copied) across one
row per leaf of the tree and scores them in one batched forward; rows are right-padded, and with
causal attention a padding token only follows the real ones, so no position that is read sees it.

Used by the embedded engine for `/route` and by training to measure validation routing accuracy
with the model being trained, so both count the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from service.engine import kv_batch
from service.routing.candidates import Prefix, leaf_rows, needed_steps, total


def tail_positions(start: int, length: int, rows: int, rope_delta: int | None) -> torch.Tensor:
    """Position ids of `length` text tokens after a prompt of `start` tokens, for `rows` rows:
    `[rows, length]`, or `[4, rows, length]` (text positions, then the three MRoPE rows shifted by
    the prompt's `rope_delta`) after a prompt with images."""
    text = torch.arange(start, start + length).unsqueeze(0).expand(rows, -1)
    if rope_delta is None:
        return text
    return torch.cat([text.unsqueeze(0), (text + rope_delta).unsqueeze(0).expand(3, -1, -1)], dim=0)


def continuation_logprobs(
    model: Any,
    cache: Any,
    last_logits: torch.Tensor,
    start: int,
    continuations: Sequence[Sequence[int]],
    model_kwargs: Callable[[int], dict[str, Any]] = lambda rows: {},
    rope_delta: int | None = None,
    pad_id: int = 0,
) -> list[float]:
    """Total log-probability of each continuation after a prompt of `start` tokens whose KV is in
    `cache` (batch of one) and whose next-token logits are `last_logits`. `model_kwargs(rows)` adds
    per-batch arguments (the adapter of every row)."""
    first = torch.log_softmax(last_logits.float(), dim=-1)
    scores = [float(first[int(c[0])]) if len(c) else 0.0 for c in continuations]
    rows = leaf_rows(continuations)
    if not rows:
        return scores
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[*r, *([pad_id] * (length - len(r)))] for r in rows])
    out = model(
        input_ids=input_ids,
        past_key_values=kv_batch.repeat(cache, len(rows), model.config),
        position_ids=tail_positions(start, length, len(rows), rope_delta),
        use_cache=True,
        **model_kwargs(len(rows)),
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    for i, cont in enumerate(continuations):
        if len(cont) < 2:
            continue
        inputs = tuple(int(t) for t in cont[:-1])
        row = next(j for j, r in enumerate(rows) if r[: len(inputs)] == inputs)
        scores[i] += float(sum(logprobs[row, j, int(cont[j + 1])] for j in range(len(cont) - 1)))
    return scores


def tree_nodes(steps: Mapping[Prefix, object]) -> list[Prefix]:
    """The prefix tree's non-empty inputs (the keys of `needed_steps`): every distinct prefix of a
    continuation minus its last token, shortest first (a node's ancestors come before it). Each is
    one input position whose output is the next-token distribution after that prefix."""
    return sorted((p for p in steps if p), key=lambda p: (len(p), p))


def tree_mask(past: int, prompt: int, nodes: Sequence[Prefix], dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask `[1, 1, prompt + nodes, past + prompt + nodes]`: the prompt's own
    tokens are causal over the cached `past` and each other; a tree node sees the cached past, the
    whole prompt, and the nodes that are its prefixes (itself included), never a sibling."""
    queries = prompt + len(nodes)
    allowed = torch.zeros(queries, past + queries, dtype=torch.bool)
    allowed[:, :past] = True
    allowed[:prompt, past:past + prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    allowed[prompt:, past:past + prompt] = True
    index = {node: i for i, node in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for depth in range(1, len(node) + 1):
            allowed[prompt + i, past + prompt + index[node[:depth]]] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def packed_logprobs(
    model: Any,
    cache: Any,
    past: int,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    model_kwargs: dict[str, Any] | None = None,
) -> list[float]:
    """Total log-probability of each continuation after `prompt_ids`, which follow `past` tokens
    already in `cache` (batch of one; 0 and an empty cache for a whole prompt), in one forward."""
    if not prompt_ids:
        raise ValueError("packed_logprobs needs at least one prompt token after the cache")
    steps = needed_steps(continuations)
    nodes = tree_nodes(steps)
    prompt = len(prompt_ids)
    tokens = [*prompt_ids, *(node[-1] for node in nodes)]
    positions = [*range(past, past + prompt), *(past + prompt + len(node) - 1 for node in nodes)]
    dtype = next(model.parameters()).dtype
    out = model(
        input_ids=torch.tensor([tokens]),
        attention_mask=tree_mask(past, prompt, nodes, dtype),
        position_ids=torch.tensor([positions]),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=torch.arange(prompt - 1, prompt + len(nodes)),  # the prompt's last token, then the nodes
        **(model_kwargs or {}),
    )
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    rows = {(): 0, **{node: i + 1 for i, node in enumerate(nodes)}}
    table = {prefix: {t: float(logprobs[rows[prefix], t]) for t in wanted}
             for prefix, wanted in steps.items()}
    return [total(table, cont) if len(cont) else 0.0 for cont in continuations]
