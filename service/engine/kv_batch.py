"""The running batch of the embedded engine: one KV cache shared by sequences of different
lengths and different adapters.

Sequences are left-padded inside the cache; each keeps its own attention-mask row and its own
position counter (rotary embeddings are applied before caching, so a sequence's keys do not
depend on where its row sits). That is what lets new requests join between decode steps: their
prefill cache is padded to the running cache's length (or the other way round) and concatenated
along the batch dimension, and finished rows are dropped with an index select.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def _pad_left(tensor: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    if extra <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(
    cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Concatenate two batches (rows of b after rows of a), left-padding the shorter one."""
    len_a, len_b = mask_a.shape[1], mask_b.shape[1]
    length = max(len_a, len_b)
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        layer_a.keys = torch.cat(
            [_pad_left(layer_a.keys, length - len_a, 2), _pad_left(layer_b.keys, length - len_b, 2)]
        )
        layer_a.values = torch.cat(
            [_pad_left(layer_a.values, length - len_a, 2), _pad_left(layer_b.values, length - len_b, 2)]
        )
    mask = torch.cat([_pad_left(mask_a, length - len_a, 1), _pad_left(mask_b, length - len_b, 1)])
    return cache_a, mask


def select_rows(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only the rows in `keep`, then drop leading columns that are padding in every row."""
    index = torch.tensor(keep, dtype=torch.long)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    mask = mask[:, start:]
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
        layer.values = layer.values.index_select(0, index)[:, :, start:, :]
    return cache, mask


def fork(cache: DynamicCache, config: object) -> DynamicCache:
    """A new cache that starts from `cache`'s contents without copying them: DynamicLayer.update
    concatenates into new tensors, so the shared prefix tensors are never written to."""
    forked = DynamicCache(config=config)
    for mine, theirs in zip(forked.layers, cache.layers, strict=True):
        mine.lazy_initialization(theirs.keys, theirs.values)
        mine.keys, mine.values = theirs.keys, theirs.values
    return forked


def repeat(cache: DynamicCache, rows: int, config: object) -> DynamicCache:
    """A cache of `rows` rows that all start from `cache`'s single row, as expanded views (no copy):
    the candidates of one routing decision share their prompt's KV."""
    repeated = DynamicCache(config=config)
    for mine, theirs in zip(repeated.layers, cache.layers, strict=True):
        keys = theirs.keys.expand(rows, -1, -1, -1)
        values = theirs.values.expand(rows, -1, -1, -1)
        mine.lazy_initialization(keys, values)
        mine.keys, mine.values = keys, values
    return repeated
