"""Validation of HF configs: every unsupported or inconsistent input is named."""

import pytest

from dist_lora.models.spec import spec_from_config
from dist_lora.testing.tiny import TINY_CONFIGS


def _cfg(**change):
    return {**TINY_CONFIGS["llama"], **change}


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
])
def test_unsupported_configs_are_named(change, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        spec_from_config(_cfg(**change))


def test_missing_keys_are_listed():
    cfg = _cfg()
    del cfg["hidden_size"], cfg["vocab_size"]
    with pytest.raises(ValueError, match="hidden_size, vocab_size"):
        spec_from_config(cfg)


@pytest.mark.parametrize("tp,pp,needle", [
    (3, 1, "does not divide num_attention_heads=8"),
    (8, 1, "does not divide num_key_value_heads=4"),
    (1, 3, "larger than the number of layers"),
])
def test_layout_errors(tp, pp, needle):
    with pytest.raises(ValueError, match=needle):
        spec_from_config(_cfg()).check_layout(tp, pp)


def test_rope_parameters_and_llama3_scaling():
    spec = spec_from_config(_cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}))
    assert (spec.rope_theta, spec.rope_llama3_factor) == (500000.0, 8.0)


def test_padded_vocab_and_features():
    spec = spec_from_config(_cfg())
    assert [spec.padded_vocab(t) for t in (1, 2, 4)] == [101, 102, 104]
    assert spec.features == {"untied"}
    qwen = spec_from_config(TINY_CONFIGS["qwen2"])
    assert qwen.features == {"tied", "qkv_bias"}
    mistral = spec_from_config(TINY_CONFIGS["mistral"])
    assert mistral.sliding_window == 5
