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


def _hf_saved(name: str, **change) -> dict:
    """config.json as transformers writes it for a tiny config (its defaults and new-style keys)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**{**TINY_CONFIGS[name], **change}).to_dict()


def test_qwen3_head_dim_qk_norm_and_embeddings():
    spec = spec_from_config(_hf_saved("qwen3"))
    assert (spec.family.name, spec.head_dim, spec.hidden_size // spec.num_heads) == ("qwen3", 16, 12)
    assert spec.family.qk_norm and not spec.qkv_bias and spec.rope_theta == 1e6
    assert spec.features == {"untied"} and spec.sliding_window is None
    assert spec_from_config(_hf_saved("qwen3", tie_word_embeddings=True)).features == {"tied"}


@pytest.mark.parametrize("source", ["transformers", "hub"])
def test_gemma3_attention_kinds_rope_bases_scale_and_activation(source):
    if source == "transformers":  # rope_parameters per layer type, layer_types listed
        config = _hf_saved("gemma3")
    else:  # the older config.json of the Hub: rope_theta / rope_local_base_freq / sliding_window_pattern
        config = {k: v for k, v in TINY_CONFIGS["gemma3"].items() if k != "tie_word_embeddings"}
    spec = spec_from_config(config)
    assert spec.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert (spec.sliding_window, spec.rope_theta, spec.local_rope_theta) == (4, 1e6, 1e4)
    assert spec.softmax_scale == pytest.approx(24 ** -0.5) and spec.activation == "gelu_tanh"
    assert spec.tied_embeddings and spec.family.zero_centered_norms and spec.family.qk_norm


@pytest.mark.parametrize("change,needle", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ({"sliding_window": None}, "gemma3 models need sliding_window"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope scaling type 'linear'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must list 3 entries"),
])
def test_unsupported_gemma3_configs_are_named(change, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        spec_from_config({**TINY_CONFIGS["gemma3"], **change})


def test_qwen_sliding_windows_follow_transformers_layer_types():
    """use_sliding_window slides layers >= max_window_layers only (transformers' rule)."""
    qwen = {**TINY_CONFIGS["qwen2"], "use_sliding_window": True, "sliding_window": 4}
    assert spec_from_config({**qwen, "max_window_layers": 2}).sliding_window is None  # no layer slides
    partial = spec_from_config({**qwen, "max_window_layers": 1})
    assert partial.sliding_window == 4 and partial.layer_types == ("full_attention", "sliding_attention")
    saved = spec_from_config(_hf_saved("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert saved.layer_types == partial.layer_types


@pytest.mark.parametrize("name,tp,needle", [
    ("llama", 3, "tensor_parallel=3 does not divide num_attention_heads=8; valid tensor_parallel sizes "
                 "for this model: 1, 2, 4"),
    ("gemma3", 4, "tensor_parallel=4 does not divide num_key_value_heads=2; valid tensor_parallel sizes "
                  "for this model: 1, 2"),
])
def test_tp_errors_name_the_valid_sizes(name, tp, needle):
    with pytest.raises(ValueError) as info:
        spec_from_config(TINY_CONFIGS[name]).check_layout(tp, 1)
    assert needle in str(info.value)


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model_type 'gemma2'; dist_lora supports: llama, mistral, "
                                         "qwen2, qwen3, gemma3_text"):
        spec_from_config({**TINY_CONFIGS["gemma3"], "model_type": "gemma2"})
