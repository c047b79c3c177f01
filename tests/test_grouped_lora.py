"""The embedded engine's LoRA (the adapter's tensors read from its folder, one pair of products per
layer for every adapter of a batch) against plain peft's `adapter_names` on the real model and real
adapters, in float32: a batch of one adapter and the base rows of a mixed batch are peft's numbers
bit for bit, a mixed batch equal to rounding."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from service.adapter_validation import modules_of
from service.engine.grouped_lora import BASE, GroupedLoRA
from service.engine.lora_weights import read_lora
from tests.support import make_lora_adapter

ROWS = [BASE, "alpha", "beta", "delta", "gamma", "alpha", "delta", BASE]


def peft_model(base_model, adapters) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(base_model.path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, str(adapters["alpha"]), adapter_name="alpha")
    for name in ("beta", "gamma", "delta"):
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def models(base_model, task_adapters, tmp_path_factory):
    """alpha, beta, gamma: rank 8 on q and v, scaling 1; delta: rank 4 on four modules (two that
    no other adapter has), scaling 3, so layers hold different sets of adapters of different widths."""
    delta = make_lora_adapter(base_model, tmp_path_factory.mktemp("grouped") / "delta", seed=7, rank=4,
                              target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
    config = json.loads((delta / "adapter_config.json").read_text())
    (delta / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 12}))
    adapters = {**task_adapters, "delta": delta}
    reference = peft_model(base_model, adapters)
    assert reference.base_model.model.model.layers[0].mlp.gate_proj.scaling == {"delta": 3.0}
    model = AutoModelForCausalLM.from_pretrained(base_model.path, dtype=torch.float32).eval()
    grouped = GroupedLoRA(model)
    for name, path in adapters.items():
        grouped.add(name, read_lora(path, modules_of(model).shapes))
    return reference, model, grouped


def test_grouped_lora_gives_peft_logits(models):
    reference, net, grouped = models
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (len(ROWS), 12))
    with torch.inference_mode():
        expected = reference(input_ids=ids, adapter_names=ROWS).logits
        with grouped.rows(ROWS):
            mixed = net(input_ids=ids).logits
        without_delta = [BASE, "alpha", "beta", "alpha"]  # layers only delta touches get no row
        with grouped.rows(without_delta):
            partial = net(input_ids=ids[:4]).logits
        partial_expected = reference(input_ids=ids[:4], adapter_names=without_delta).logits
        with grouped.rows(["beta"] * len(ROWS)):
            uniform = net(input_ids=ids).logits
        uniform_expected = reference(input_ids=ids, adapter_names=["beta"] * len(ROWS)).logits
        with grouped.rows([BASE] * len(ROWS)):
            bare = net(input_ids=ids).logits
        bare_expected = reference(input_ids=ids, adapter_names=[BASE] * len(ROWS)).logits
        outside = net(input_ids=ids).logits  # no plan: the base model

    assert torch.equal(uniform, uniform_expected)  # one adapter: peft's own expression
    assert torch.equal(bare, bare_expected) and torch.equal(outside, bare_expected)
    base_rows = [i for i, n in enumerate(ROWS) if n == BASE]
    assert torch.equal(mixed[base_rows], expected[base_rows])  # exact zeros were added to them
    torch.testing.assert_close(mixed, expected, rtol=0, atol=2e-4)
    torch.testing.assert_close(partial, partial_expected, rtol=0, atol=2e-4)
    assert torch.equal(mixed.argmax(-1), expected.argmax(-1))
    # and the adapters do differ, so the comparison above says something about which row got which
    assert (expected[1] - expected[2]).abs().max() > 1e-2 and (expected[0] - expected[1]).abs().max() > 1e-2
