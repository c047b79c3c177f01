"""Images on the embedded engine (issue 7): a tiny random Qwen3-VL with the real Qwen tokenizer
(tests/vl_support.py), LoRA adapters on its language model, and the engine's continuous batching.

The reference is transformers' own path, built independently of the engine: the Qwen3-VL
processor (placeholder expansion, pixels) and `generate` on a `PeftModel` (MRoPE positions),
one request at a time. The engine must give the same greedy tokens while it batches image rows,
text rows and different adapters together.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.base_model import resolve_base_model
from service.engine.base import AdapterRef, SamplingParams
from service.engine.embedded import EmbeddedEngine
from service.engine.errors import InputRefusedError
from service.settings import Settings
from tests.vl_support import load_vl_processor, sample_image

RED, BLUE = (220, 30, 30), (30, 30, 220)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine(tiny_vl: Path, vl_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    cache = tmp_path_factory.mktemp("cache")
    settings = Settings(base_model=str(tiny_vl), cache_dir=cache, max_model_len=1024)
    engine = EmbeddedEngine(settings, resolve_base_model(str(tiny_vl), cache))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    refs = {name: AdapterRef(name, 1, path) for name, path in vl_adapters.items()}
    for ref in refs.values():
        loop.run_until_complete(engine.add_adapter(ref))
    yield engine, refs, loop
    loop.run_until_complete(engine.shutdown())
    loop.close()


def chat(image: Any | None, text: str) -> list[dict[str, Any]]:
    content: Any = text if image is None else [{"type": "image", "image": image}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def ids_of(engine: EmbeddedEngine, messages: list[dict[str, Any]]) -> list[int]:
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)


def reference_tokens(tiny_vl: Path, adapters: dict[str, Path], jobs: list[tuple[Any, str, str | None]]) -> list:
    """Greedy tokens from transformers + peft, one request at a time, through the Qwen3-VL processor."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    processor = load_vl_processor(tiny_vl)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl, dtype=torch.float32).eval()
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(adapters[name]), adapter_name=name)
    out = []
    for image, text, adapter in jobs:
        messages = copy.deepcopy(chat(None, text)) if image is None else [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    generated = peft.generate(**inputs, **kwargs)
            else:
                peft.set_adapter(adapter)
                generated = peft.generate(**inputs, **kwargs)
        out.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def test_batched_image_and_text_rows_equal_transformers(engine, tiny_vl: Path, vl_adapters: dict[str, Path]) -> None:
    eng, refs, loop = engine
    red, blue = sample_image(RED), sample_image(BLUE, mark=1)
    jobs = [(red, "What is on the screen?", "alpha"), (blue, "What is on the screen?", "alpha"),
            (red, "Describe it.", "beta"), (None, "Turn on the lights", "beta"), (blue, "Name the tool.", None),
            (None, "Plain text on the base model", None)]
    params = SamplingParams(max_tokens=NEW_TOKENS)

    async def one(i: int, image: Any, text: str, adapter: str | None) -> list[int]:
        tokens: list[int] = []
        images = [] if image is None else [image]
        async for delta in eng.generate(f"vl{i}", ids_of(eng, chat(image, text)),
                                        refs[adapter] if adapter else None, params, images):
            tokens.extend(delta.token_ids)
        return tokens

    async def all_at_once() -> list[list[int]]:
        return await asyncio.gather(*[one(i, *job) for i, job in enumerate(jobs)])

    got = loop.run_until_complete(all_at_once())
    expected = reference_tokens(tiny_vl, vl_adapters, jobs)
    assert [len(t) for t in got] == [NEW_TOKENS] * len(jobs)
    assert got == expected
    assert got[0] != got[1], "red and blue images gave the same tokens: the image did not reach the model"


def test_a_lora_on_the_vision_tower_in_a_mixed_batch_equals_transformers(engine, tiny_vl: Path,
                                                                         vl_adapters: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """An adapter with LoRA on the vision tower (whose inputs are image patches, not one row per
    sequence) sent together with image and text requests on other adapters: every answer is the one
    transformers + peft gives that request alone."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tests.support import save_random_lora

    eng, refs, loop = engine
    tower = tmp_path / "tower"
    save_random_lora(lambda: AutoModelForImageTextToText.from_pretrained(tiny_vl, dtype=torch.float32), tower, 5, 8,
                     r".*(language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)|visual\.blocks\.\d+\.attn\.qkv)",
                     4.0)
    ref = AdapterRef("tower", 1, tower)
    loop.run_until_complete(eng.add_adapter(ref))
    red, blue = sample_image(RED), sample_image(BLUE, mark=1)
    jobs = [(red, "What is on the screen?", "tower"), (blue, "What is on the screen?", "alpha"),
            (None, "Turn on the lights", "tower"), (blue, "Name the tool.", "tower"), (red, "Describe it.", None)]
    params = SamplingParams(max_tokens=NEW_TOKENS)

    async def one(i: int, image: Any, text: str, adapter: str | None) -> list[int]:
        images = [] if image is None else [image]
        chosen = ref if adapter == "tower" else refs[adapter] if adapter else None
        return [t async for delta in eng.generate(f"tower{i}", ids_of(eng, chat(image, text)), chosen, params, images)
                for t in delta.token_ids]

    async def all_at_once() -> list[list[int]]:
        return await asyncio.gather(*[one(i, *job) for i, job in enumerate(jobs)])

    try:
        got = loop.run_until_complete(all_at_once())
    finally:
        loop.run_until_complete(eng.remove_adapter(ref))
    assert got == reference_tokens(tiny_vl, {**vl_adapters, "tower": tower}, jobs)


def test_scoring_sees_the_image_and_the_adapter(engine) -> None:
    eng, refs, loop = engine
    candidates = eng.tokenizer.encode(" alpha beta gamma", add_special_tokens=False)[:3]

    def score(image: Any, adapter: str | None, prefix_len: int = 0) -> list[float]:
        ids = ids_of(eng, chat(image, "Which expert?"))
        return loop.run_until_complete(eng.next_token_logprobs(ids, refs[adapter] if adapter else None, candidates,
                                                               prefix_len, [image]))

    red_alpha, blue_alpha, red_base = score(sample_image(RED), "alpha"), score(sample_image(BLUE), "alpha"), \
        score(sample_image(RED), None)
    assert red_alpha != blue_alpha and red_alpha != red_base
    assert score(sample_image(RED), "alpha", prefix_len=3) == pytest.approx(red_alpha, abs=1e-5)
    ids = ids_of(eng, chat(sample_image(RED), "Which expert?"))
    whole = loop.run_until_complete(eng.sequence_logprobs(ids, refs["alpha"], [[c] for c in candidates],
                                                          [sample_image(RED)]))
    assert whole == pytest.approx(red_alpha, abs=1e-4)


def test_image_count_must_match_the_placeholders(engine) -> None:
    eng, refs, loop = engine
    ids = ids_of(eng, chat(None, "no image in the template"))

    async def run() -> None:
        async for _ in eng.generate("bad", ids, None, SamplingParams(max_tokens=2), [sample_image(RED)]):
            pass

    with pytest.raises(InputRefusedError, match="0 image placeholders for 1 images"):
        loop.run_until_complete(run())
    assert eng.accepts_images


def test_whole_names_with_an_image_equal_transformers(engine, tiny_vl: Path, vl_adapters: dict[str, Path]) -> None:
    """Multi-token names after an image prompt, scored in one batched pass over the prompt's KV, equal
    each name scored with a full transformers + peft forward pass of its own (pixels included)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from service.routing.router import Router

    eng, refs, loop = engine
    router = Router(eng)
    names = ("calendar", "calendar-read", "calendar-write", "lights")
    answers = [router.answer_tokens(n) for n in names]
    image = sample_image(RED)
    ids, images = router.prompt(chat(image, "what is on my calendar?"))
    got = loop.run_until_complete(eng.sequence_logprobs(ids, refs["alpha"], answers, images))

    processor = load_vl_processor(tiny_vl)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(model, str(vl_adapters["alpha"])).eval()
    messages = [{"role": "system", "content": [{"type": "text", "text": "Name the expert for this request."}]},
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what is on my calendar?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    expected = []
    with torch.no_grad():
        for answer in answers:
            whole = dict(inputs)
            whole["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
            whole["attention_mask"] = torch.ones_like(whole["input_ids"])
            if "mm_token_type_ids" in inputs:  # text tokens after the prompt
                whole["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                        torch.zeros(1, len(answer), dtype=torch.long)], dim=1)
            logprobs = torch.log_softmax(peft(**whole).logits[0].float(), dim=-1)
            expected.append(float(sum(logprobs[start - 1 + i, t] for i, t in enumerate(answer))))
    assert got == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("size", [(512, 512), (37, 91), (300, 517), (700, 700), (20, 20), (1000, 120)])
def test_image_tokens_are_known_from_the_size_alone(engine, tiny_vl: Path, size: tuple[int, int]) -> None:
    """The context-length check counts an image's tokens from its width and height before the image
    reaches the engine (`ImageSizes.tokens`, the processor's own resize rule). The count must be the
    length the Qwen3-VL processor's real expansion gives, for sizes it keeps, shrinks (700x700 is over
    its max_pixels) and grows (20x20)."""
    from service.context_window import prompt_length

    eng, _, _ = engine
    image = sample_image(RED, size=size)
    messages = chat(image, "count me")
    expanded = load_vl_processor(tiny_vl).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True, return_tensors="pt")["input_ids"]
    assert prompt_length(len(ids_of(eng, messages)), [image], eng.image_sizes) == expanded.shape[1]


def test_the_pixel_cap_defaults_to_the_processors_max_pixels(engine) -> None:
    """Bigger images the processor would shrink anyway; by default none bigger is decoded."""
    from service.multimodal import pixel_cap

    eng, _, _ = engine
    assert eng.image_sizes is not None
    assert pixel_cap(Settings(), eng.image_sizes) == 512 * 512  # tests/vl_support.py's longest_edge
    assert pixel_cap(Settings(max_image_pixels=1000), eng.image_sizes) == 1000
