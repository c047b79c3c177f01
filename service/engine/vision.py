"""Image inputs for the embedded engine's vision-language base models (Qwen3-VL and its kin).

The chat template leaves one `<|image_pad|>` per image in the prompt. Here each image goes
through the model's image processor (patches + grid), its placeholder is expanded to the number
of merged patches the vision tower emits for it, and the multimodal rotary positions (MRoPE:
time, height, width) of the prompt are computed once. After the prompt a sequence's positions
advance like plain text, shifted by a constant `rope_delta` (an image's patches occupy fewer
positions than tokens), which is all the decode loop needs to batch image and text rows together.

The processor is the image processor alone, not `AutoProcessor`: Qwen3-VL's processor insists on
a video processor that needs torchvision, which the CPU environment does not have (tests/VL_NOTES.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from service.base_model import is_vision_language
from service.engine.errors import InputRefusedError

MAX_ASPECT_RATIO = 200  # Qwen-VL processors refuse longer sides than this times the shorter


@dataclass
class VisionPrompt:
    ids: list[int]  # the prompt with every image placeholder expanded
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    mrope: torch.Tensor  # [3, len(ids)] positions for the rotary embedding
    rope_delta: int  # position of token i after the prompt: i + rope_delta

    def with_tail(self, tokens: Sequence[int]) -> VisionPrompt:
        """This prompt followed by plain-text tokens (an answer, a candidate name): they take the next
        positions on all three MRoPE rows, shifted by `rope_delta`, as generated tokens do."""
        start = len(self.ids)
        tail = (torch.arange(start, start + len(tokens)) + self.rope_delta).expand(3, -1)
        return replace(self, ids=[*self.ids, *tokens], mrope=torch.cat([self.mrope, tail], dim=1))


class ImageSizes:
    """What a Qwen-VL image processor does to an image's size, known before any pixel is processed:
    the largest image it keeps as it is (`max_pixels`; bigger ones it shrinks) and how many tokens
    an image of a given size expands to. Both engines use it (vLLM runs the same processor), so the
    context-length check and the pixel cap see exactly the numbers the model will."""

    def __init__(self, processor: Any):
        self.patch = int(getattr(processor, "patch_size", 14))
        self.merge = int(getattr(processor, "merge_size", 2))
        size = getattr(processor, "size", None) or {}
        self.min_pixels = int(size.get("shortest_edge") or getattr(processor, "min_pixels", 56 * 56))
        self.max_pixels = int(size.get("longest_edge") or getattr(processor, "max_pixels", 28 * 28 * 1280))

    @classmethod
    def for_model(cls, model_path: Any) -> ImageSizes:
        from transformers import AutoImageProcessor

        return cls(AutoImageProcessor.from_pretrained(model_path))

    def tokens(self, width: int, height: int) -> int:
        """Tokens one image of `width` x `height` pixels takes in the prompt (its merged patches):
        the processor's own resize rule (its Pillow module: no torchvision needed). An image it would
        refuse (sides more than 200 times apart) is the client's error, refused here before any engine."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InputRefusedError(f"image is {width}x{height} pixels; its sides may differ at most "
                                    f"{MAX_ASPECT_RATIO} times")
        factor = self.patch * self.merge
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (h // self.patch) * (w // self.patch) // self.merge**2


class VisionInputs:
    """Turns (prompt ids with one placeholder per image, PIL images) into model inputs."""

    @classmethod
    def for_model(cls, model_path: Path, model: Any) -> VisionInputs | None:
        """The image inputs of a loaded base model; None for a text-only model."""
        return cls(model_path, model.config, model.model.get_rope_index) if is_vision_language(model.config) else None

    def __init__(self, model_path: Any, config: Any, rope_index: Any):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self.sizes = ImageSizes(self.processor)
        self.image_token_id = int(config.image_token_id)
        self.merge = self.sizes.merge
        self._rope_index = rope_index  # the model's own MRoPE position function

    def prepare(self, ids: Sequence[int], images: Sequence[Any], dtype: torch.dtype) -> VisionPrompt:
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise InputRefusedError(f"the prompt has {len(slots)} image placeholders for {len(images)} images "
                                    "(does the base model's chat template render image parts?)")
        batch = self.processor(images=list(images), return_tensors="pt")
        grid = batch["image_grid_thw"]
        counts = [int(g.prod()) // self.merge**2 for g in grid]
        expanded: list[int] = []
        last = 0
        for slot, count in zip(slots, counts, strict=True):
            expanded.extend(ids[last:slot])
            expanded.extend([self.image_token_id] * count)
            last = slot + 1
        expanded.extend(ids[last:])
        input_ids = torch.tensor([expanded])
        positions, deltas = self._rope_index(input_ids, (input_ids == self.image_token_id).int(), image_grid_thw=grid)
        return VisionPrompt(expanded, batch["pixel_values"].to(dtype), grid, positions[:, 0], int(deltas.flatten()[0]))


def decode_positions(positions: list[int], deltas: list[int]) -> torch.Tensor:
    """Position ids of one decode step: `[batch, 1]` for text-only batches (unchanged), else
    `[4, batch, 1]` with each row's MRoPE shifted by its `rope_delta`."""
    text = torch.tensor(positions).unsqueeze(1)
    if not any(deltas):
        return text
    shifted = (text + torch.tensor(deltas).unsqueeze(1)).unsqueeze(0).repeat(3, 1, 1)
    return torch.cat([text.unsqueeze(0), shifted], dim=0)


def mrope_positions(text_positions: torch.Tensor, mropes: list[torch.Tensor | None]) -> torch.Tensor:
    """Position ids of a left-padded batch for a Qwen-VL forward: `[4, batch, length]`, the text
    positions (masking, cache) first, then the three MRoPE rows. Text-only rows use their text
    position three times, which is what the model does for text; image rows their own MRoPE,
    right-aligned like their tokens."""
    rows = text_positions.unsqueeze(0).repeat(3, 1, 1)
    length = text_positions.shape[1]
    for row, mrope in enumerate(mropes):
        if mrope is not None:
            n = min(length, mrope.shape[1])
            rows[:, row, length - n:] = mrope[:, mrope.shape[1] - n:]
    return torch.cat([text_positions.unsqueeze(0), rows], dim=0)
