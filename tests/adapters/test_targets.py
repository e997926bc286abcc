"""Target selection and rank / alpha patterns equal PEFT's on the same Hugging Face model, and the
plain torch.nn path (Linear / Embedding, used for HF models under DeepSpeed) computes what PEFT does."""

from __future__ import annotations

import peft
import pytest
import torch

import dist_lora as dl
from dist_lora.adapters.registry import adapter_layers
from dist_lora.testing.peft_reference import loss_of, peft_key, peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["o_proj"]),
    dict(target_modules=["q_proj", "down_proj", "embed_tokens"], exclude_modules=r".*layers\.1\.mlp\.down_proj"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "v_proj", "lm_head"], modules_to_save=["lm_head"]),
    dict(target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"model.layers.0.self_attn.q_proj": 2, "o_proj": 6},
         alpha_pattern={"layers.1.self_attn.v_proj": 3}),
]


def _ours(config):
    model = hf_model(TINY_CONFIGS["llama"])
    dl.apply_lora(model, dl.LoraConfig(**config))
    return {name: {(f.r, f.alpha) for f in layer.factors_of("default").values()} for name, layer in adapter_layers(model)}


def _theirs(config):
    model = peft.get_peft_model(hf_model(TINY_CONFIGS["llama"]), peft.LoraConfig(**config))
    prefix = "base_model.model."
    return {name[len(prefix):]: {(m.r["default"], m.lora_alpha["default"])}
            for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_selection_and_patterns_equal_peft(config):
    assert _ours(config) == _theirs(config)


def test_nothing_matched_lists_the_modules_that_could():
    with pytest.raises(ValueError, match=r"'q_projj'\] matched no module; modules that could match: .*down_proj.*q_proj"):
        dl.apply_lora(hf_model(TINY_CONFIGS["llama"]), dl.LoraConfig(target_modules=["q_projj"]))


PLAIN = {
    "lora_rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "down_proj"]),
    "embedding_lm_head_lora_bias": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["v_proj", "lm_head"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "modules_to_save": dict(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_torch_layers_equal_peft(name):
    config = dict(PLAIN[name], init_lora_weights=False)
    reference = peft_model("llama", config)
    state = peft.get_peft_model_state_dict(reference)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    loss_of(reference(ids).logits, ids).backward()
    model = hf_model(TINY_CONFIGS["llama"])
    dl.apply_lora(model, dl.LoraConfig(**config))
    dl.set_adapter_state_dict(model, state)
    logits = model(ids).logits
    assert rel_error(logits, reference(ids).logits) <= 1e-6
    loss_of(logits, ids).backward()
    ours = dl.adapter_state_dict(model, gradients=True)
    theirs = {peft_key(n): p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    assert max(rel_error(ours[k], theirs[k]) for k in ours) <= 1e-5
    if config.get("lora_bias"):
        # Llama layers have no bias to fold lora_B.bias into (PEFT warns the same at creation).
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="lora_bias cannot be merged: the base layer has no bias"):
            dl.merge_adapter(model)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a failed merge wrote"
        return
    merged = dl.merge_and_unload(model)
    with torch.no_grad():
        assert rel_error(merged(ids).logits, reference.merge_and_unload()(ids).logits) <= 1e-5
