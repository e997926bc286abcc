"""Hugging Face <-> Megatron-Core name and layout tables, one per model family.

Each entry maps one Megatron parameter (per layer where the name holds ``{layer}``, the
*global* layer index) to the Hugging Face tensor(s) it is made of, and names the layout that
turns the HF tensor(s) into this rank's shard. Layouts (see :mod:`dist_lora.models.layouts`):

``replicated``  the same full tensor on every TP rank (norm weights)
``column``      split along dim 0 (output features)
``row``         split along dim 1 (input features)
``vocab``       split along dim 0 after padding the vocabulary to a multiple of TP
``qkv``         q, k, v fused per query group: ``[ng x (nq/ng + 2) x head_dim]`` rows, split by group
``glu``         gate and up fused per rank: local ``[gate_i; up_i]`` (partition stride 2)

``when`` names a feature of the checkpoint that must be present for the entry to apply:
``qkv_bias`` (Qwen2), ``untied`` (a separate ``lm_head``) or ``tied`` (the output layer reads
the embedding). An entry applies on a rank only where the Megatron parameter exists (its PP
stage). A new family is a new table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightEntry:
    megatron: str
    hf: tuple[str, ...]
    layout: str
    when: str | None = None

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron


@dataclass(frozen=True)
class Family:
    """A model family: which HF configs it accepts and how its weights map."""

    name: str
    model_types: tuple[str, ...]
    weights: tuple[WeightEntry, ...]
    qkv_bias: bool = False  # q/k/v projections always carry a bias (Qwen2)
    sliding_window_key: str | None = None  # config key of a sliding attention window, if any
    sliding_window_switch: str | None = None  # config key that turns the window on, if any


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."

_DECODER = (
    WeightEntry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    WeightEntry(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",), "replicated"),
    WeightEntry(
        _M + "self_attention.linear_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        "qkv",
    ),
    WeightEntry(
        _M + "self_attention.linear_qkv.bias",
        (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
        "qkv",
        when="qkv_bias",
    ),
    WeightEntry(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "row"),
    WeightEntry(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), "replicated"),
    WeightEntry(
        _M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "glu"
    ),
    WeightEntry(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "row"),
    WeightEntry("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    WeightEntry("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
    # Tied embeddings: a last pipeline stage that is not also the first holds its own copy.
    WeightEntry("output_layer.weight", ("model.embed_tokens.weight",), "vocab", when="tied"),
)

LLAMA = Family("llama", ("llama",), _DECODER)
MISTRAL = Family("mistral", ("mistral",), _DECODER, sliding_window_key="sliding_window")
QWEN2 = Family(
    "qwen2",
    ("qwen2",),
    _DECODER,
    qkv_bias=True,
    sliding_window_key="sliding_window",
    sliding_window_switch="use_sliding_window",
)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2)


def family_for(model_type: str | None) -> Family:
    """The family of an HF ``model_type``; a clear error for anything else."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; dist_lora supports: {known}")
