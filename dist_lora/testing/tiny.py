"""Tiny Hugging Face models with random weights, built offline, for tests, demos and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Small configs of each supported family. The Llama vocabulary (101) is prime, so no TP size
# divides it; Mistral uses a sliding window shorter than the test sequences; Qwen2 has q/k/v
# biases and tied embeddings.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=101, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=128, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=5,
                    tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=96, hidden_size=64,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                  use_sliding_window=False),
    # 4 experts, top-2, an expert FFN (48) that ETP=2 splits, GQA (4 / 2 heads).
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=96, hidden_size=64,
                    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False, router_aux_loss_coef=0.02),
    # Qwen3-MoE: q / k norms, an explicit head_dim (32, not hidden / heads = 16), top-k weights not
    # renormalised (norm_topk_prob=False: the other routing of the two families).
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=96, hidden_size=64,
                      intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                      max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                      router_aux_loss_coef=0.001),
}


def hf_model(config: dict, seed: int = 0, std: float = 0.1):
    """An HF causal LM from a config dict, every parameter drawn from N(0, std^2) with ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model.eval()


def save_tiny(config: dict | str | Path, out_dir: str | Path, seed: int = 0,
              max_shard_size: str | None = None):
    """Build an HF model (config dict or JSON path) and save it to ``out_dir``; return it."""
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    model = hf_model(config, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    return model


def experts_reached(model, ids: torch.Tensor) -> list[set[int]]:
    """For each layer of an HF mixture-of-experts model, the experts its router sends the tokens
    of ``ids`` to (tests check that a batch reaches every expert)."""
    reached: list[set[int]] = []

    def record(_module, _inputs, output):
        reached.append(set(output[2].unique().tolist()))  # (logits, top-k weights, top-k indices)

    hooks = [layer.mlp.gate.register_forward_hook(record) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return reached
