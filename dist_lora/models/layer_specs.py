"""Megatron-Core layer specs of the model families, built from Megatron's local GPT layer.

A family names its layer-spec function in ``Family.layer_spec`` (the table is ``LAYER_SPECS`` in
:mod:`dist_lora.models.build`). Every function takes the :class:`ModelSpec` and returns the
``ModuleSpec`` of one decoder layer; the layers of a stage are built from it by Megatron's
``TransformerBlock``, which numbers them globally (so per-layer choices such as the attention
window follow the layer's global index under any pipeline layout).

The pieces are separate so that families can share them: :func:`with_attention_norms` puts
dist_lora's norms (and, for Qwen3 / Gemma 3, the per-head q / k norms over ``head_dim``) into any
Megatron local layer spec, dense or mixture-of-experts; :func:`decoder_layer_spec` is the dense
Llama / Mistral / Qwen2 / Qwen3 layer.
"""

from __future__ import annotations

from dist_lora.integrations.megatron import ModuleSpec, get_gpt_layer_local_spec
from dist_lora.models.norm import TorchNorm
from dist_lora.models.spec import ModelSpec


def with_attention_norms(layer: ModuleSpec, spec: ModelSpec) -> ModuleSpec:
    """``layer`` with :class:`TorchNorm` as its input / pre-MLP norms and, where the family has
    them, as the q / k norms (Megatron applies them per head: ``[s, b, heads/p, head_dim]``)."""
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    if spec.family.qk_norm:
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = TorchNorm
        attention.k_layernorm = TorchNorm
    return layer


def local_layer_spec(spec: ModelSpec, **megatron_options) -> ModuleSpec:
    """Megatron's local GPT layer (RMSNorm, q / k norms as the family has them) with our norms;
    ``megatron_options`` go to ``get_gpt_layer_local_spec`` (e.g. ``num_experts``)."""
    layer = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=spec.family.qk_norm, **megatron_options)
    return with_attention_norms(layer, spec)


def decoder_layer_spec(spec: ModelSpec) -> ModuleSpec:
    """The dense pre-norm decoder layer: attention, then a gated MLP."""
    return local_layer_spec(spec)
