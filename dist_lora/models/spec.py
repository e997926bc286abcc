"""``ModelSpec``: the dimensions of a Hugging Face decoder checkpoint, read and validated once.

Everything here is computed from ``config.json`` alone, so every rank reaches the same verdict
on a bad config without talking to the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_lora.models.experts import ExpertSpec, expert_spec
from dist_lora.models.families import Family, family_for

_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of one decoder model (Llama / Mistral / Qwen2 layout)."""

    family: Family
    hf_config: dict = field(repr=False, compare=False)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    rope_llama3_factor: float | None
    norm_eps: float
    max_positions: int
    sliding_window: int | None
    experts: ExpertSpec | None = None  # the routed experts of a mixture-of-experts family

    @property
    def features(self) -> frozenset[str]:
        """Feature flags that select optional table entries (see ``WeightEntry.when``)."""
        flags = set()
        if self.qkv_bias:
            flags.add("qkv_bias")
        flags.add("tied" if self.tied_embeddings else "untied")
        return frozenset(flags)

    def padded_vocab(self, tp_size: int) -> int:
        """Vocabulary rounded up to a multiple of the TP size (Megatron shards it evenly)."""
        return math.ceil(self.vocab_size / tp_size) * tp_size

    def check_layout(self, tp_size: int, pp_size: int) -> None:
        """Raise ``ValueError`` naming the dimension that a TP / PP size does not divide."""
        if self.num_heads % tp_size:
            raise ValueError(
                f"tensor_parallel={tp_size} does not divide num_attention_heads={self.num_heads}"
            )
        if self.num_kv_heads % tp_size:
            raise ValueError(
                f"tensor_parallel={tp_size} does not divide num_key_value_heads={self.num_kv_heads}; "
                f"use a TP size that divides it"
            )
        if self.experts is None and self.ffn_hidden_size % tp_size:  # TP does not split routed experts
            raise ValueError(
                f"tensor_parallel={tp_size} does not divide intermediate_size={self.ffn_hidden_size}"
            )
        if pp_size > self.num_layers:
            raise ValueError(
                f"pipeline_parallel={pp_size} is larger than the number of layers ({self.num_layers})"
            )
        if self.num_layers % pp_size:
            raise ValueError(
                f"pipeline_parallel={pp_size} does not divide the number of layers ({self.num_layers})"
            )

    def layers_of_stage(self, pp_rank: int, pp_size: int) -> range:
        per_stage = self.num_layers // pp_size
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _rope(config: dict) -> tuple[float, float | None]:
    """RoPE base and the llama3 scaling factor (``None`` when unscaled)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        for key, expected in _LLAMA3_ROPE_DEFAULTS.items():
            if float(params.get(key, expected)) != expected:
                raise ValueError(
                    f"llama3 rope scaling with {key}={params[key]} is not supported "
                    f"(Megatron-Core implements {key}={expected})"
                )
        return theta, float(params.get("factor", 8.0))
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: default, llama3")


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    """Validate an HF ``config.json`` dict and derive the model's dimensions."""
    family = family_for(config.get("model_type"))
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    for key in family.must_be_off:
        if config.get(key):
            raise ValueError(f"{key}={config[key]!r} is not supported for {family.name}; set {key}=false")
    qkv_bias = family.qkv_bias
    if config.get("attention_bias"):
        raise ValueError(
            "attention_bias=True (bias on q, k, v and o) is not supported; Qwen2-style q/k/v-only "
            "bias is"
        )
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    window = None
    if family.sliding_window_key and config.get(family.sliding_window_key):
        switch = family.sliding_window_switch
        if switch is None or config.get(switch):
            window = int(config[family.sliding_window_key])
            if family.name == "qwen2" and config.get("max_window_layers", 0) < config["num_hidden_layers"]:
                raise ValueError("Qwen2 sliding windows on only some layers (max_window_layers) are not supported")
    theta, llama3 = _rope(config)
    return ModelSpec(
        family=family,
        hf_config=dict(config),
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        rope_theta=theta,
        rope_llama3_factor=llama3,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        sliding_window=window,
        experts=expert_spec(config, family.experts) if family.experts is not None else None,
    )


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``config.json`` of an HF model directory into a ``ModelSpec``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return spec_from_config(config)
