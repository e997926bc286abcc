"""Bad input to the weight-driven initialisations: clear errors, and the model left as it was.

Single process on a plain Hugging Face model (the same code path as a TP=1 Megatron model); the
errors raised on every rank of a TP group are checked in test_weight_init_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from dist_lora import LoraConfig, apply_lora, export_peft
from dist_lora.config import LoftQConfig
from dist_lora.integrations import bitsandbytes as bnb
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("value", ["pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "pissa_niter_2.5"])
def test_pissa_niter_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match="non-negative integer, e.g. 'pissa_niter_4'"):
        LoraConfig(init_lora_weights=value)


def test_pissa_niter_zero_is_accepted_as_in_peft():
    LoraConfig(init_lora_weights="pissa_niter_0")


def test_loftq_without_bitsandbytes_is_refused_before_the_model_is_touched(monkeypatch):
    model = hf_model(TINY_CONFIGS["llama"])
    before = _snapshot(model)
    monkeypatch.setattr(bnb, "available", lambda: False)
    config = LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())
    with pytest.raises(ValueError, match="needs bitsandbytes, which is not installed; install it with"):
        apply_lora(model, config)
    assert _unchanged(model, before)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.parametrize("loftq, words", [({}, "needs loftq_config"),
                                          ({"loftq_bits": 8}, "4-bit nf4 only"),
                                          ({"loftq_iter": 0}, "positive integer"),
                                          ({"loftq_bitz": 4}, "unknown keys")])
def test_loftq_config_errors(loftq, words):
    with pytest.raises(ValueError, match=words):
        LoraConfig(init_lora_weights="loftq", loftq_config=loftq)


def test_loftq_config_round_trips_through_json(tmp_path):
    config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=3))
    config.to_json(tmp_path / "c.json")
    assert LoraConfig.from_json(tmp_path / "c.json").loftq_config == {"loftq_bits": 4, "loftq_iter": 3}


def test_rank_above_the_weight_is_refused_before_the_model_is_touched():
    model = hf_model(TINY_CONFIGS["llama"])
    before = _snapshot(model)
    with pytest.raises(ValueError, match="lower r"):
        apply_lora(model, LoraConfig(r=65, target_modules=["q_proj"], init_lora_weights="olora"))
    assert _unchanged(model, before)


def test_conversion_export_needs_the_initial_adapter(tmp_path):
    model = apply_lora(hf_model(TINY_CONFIGS["llama"]), LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="export the adapter with export_peft right after apply_lora"):
        export_peft(model, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "missing")
    assert not (tmp_path / "out").exists()
    other = apply_lora(hf_model(TINY_CONFIGS["llama"]), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    initial = export_peft(other, tmp_path / "other")
    with pytest.raises(ValueError, match="expected shape"):
        export_peft(model, tmp_path / "out", path_initial_model_for_weight_conversion=initial)
