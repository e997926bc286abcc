"""Build an (empty) Megatron-Core ``GPTModel`` for this rank's TP shard and PP stage."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from dist_lora.integrations.megatron import GPTModel, TransformerBlockSubmodules, TransformerConfig
from dist_lora.integrations.megatron_cpu import cpu_device_mode
from dist_lora.models.gemma3 import finish_gemma3, gemma3_layer_spec
from dist_lora.models.layer_specs import decoder_layer_spec
from dist_lora.models.norm import TorchNorm
from dist_lora.models.pipeline_layout import megatron_uneven_counts
from dist_lora.models.spec import SLIDING, ModelSpec
from dist_lora.parallel import ParallelGroups


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


# ModelSpec.activation -> the MLP's activation (gated: act(gate) * up)
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


class Builder(NamedTuple):
    """How a family's stage is built: ``layer_spec(spec)`` gives the Megatron ``ModuleSpec`` of one
    decoder layer; ``finish(model, spec)``, if any, adds what a layer spec cannot express after
    Megatron built the stage (hooks, extra norms), before any weight is loaded."""

    layer_spec: Callable[[ModelSpec], object]
    finish: Callable[[torch.nn.Module, ModelSpec], None] | None = None


# Family.layer_spec -> its Builder
LAYER_SPECS = {
    "decoder": Builder(decoder_layer_spec),
    "gemma3": Builder(gemma3_layer_spec, finish_gemma3),
}


def _window(spec: ModelSpec) -> dict:
    """Megatron's sliding-window settings: ``window_size`` and, when only some layers slide,
    ``window_attn_skip_freq`` as a per-layer 0 / 1 list (indexed by global layer number - 1)."""
    if spec.sliding_window is None:
        return {"window_size": None}
    out = {"window_size": (spec.sliding_window - 1, 0)}
    if spec.layer_types is not None:
        out["window_attn_skip_freq"] = [int(kind == SLIDING) for kind in spec.layer_types]
    return out


def transformer_config(spec: ModelSpec, groups: ParallelGroups, dtype: torch.dtype) -> TransformerConfig:
    """Megatron ``TransformerConfig`` equivalent to the HF config (dropout off, no fusions)."""
    first, last = megatron_uneven_counts(spec.stage_sizes(groups.pp_size))
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        sequence_parallel=groups.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        layernorm_zero_centered_gamma=spec.family.zero_centered_norms,
        qk_layernorm=spec.family.qk_norm,
        softmax_scale=spec.softmax_scale,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[spec.activation],
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=False,
        batch_p2p_sync=False,
        **_window(spec),
    )


def build_gpt(spec: ModelSpec, groups: ParallelGroups, dtype: torch.dtype) -> GPTModel:
    """A ``GPTModel`` with this stage's layers; weights are uninitialised until loaded."""
    config = transformer_config(spec, groups, dtype)
    builder = LAYER_SPECS[spec.family.layer_spec]
    layer = builder.layer_spec(spec)
    layers = spec.layers_of_stage(groups.pp_rank, groups.pp_size)
    block = TransformerBlockSubmodules(layer_specs=[layer] * len(layers), layer_norm=TorchNorm)
    # Tied embeddings on a PP > 1 last stage are synchronised at construction via ``.cuda()``.
    with cpu_device_mode():
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=spec.padded_vocab(groups.tp_size),
            max_sequence_length=spec.max_positions,
            pre_process=groups.is_first_stage,
            post_process=groups.is_last_stage,
            share_embeddings_and_output_weights=spec.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
            rope_scaling=spec.rope_llama3_factor is not None,
            rope_scaling_factor=spec.rope_llama3_factor or 8.0,
            parallel_output=True,
        )
    if builder.finish is not None:
        builder.finish(model, spec)
    return model


def check_stage_layers(model: GPTModel, spec: ModelSpec, groups: ParallelGroups) -> None:
    """Megatron numbers the layers of a stage itself (from the config's first / last stage
    counts); raise if that disagrees with ``spec.layers_of_stage``, which everything else uses."""
    numbers = [layer.layer_number - 1 for layer in model.decoder.layers]
    expected = list(spec.layers_of_stage(groups.pp_rank, groups.pp_size))
    if numbers != expected:
        raise RuntimeError(f"Megatron-Core placed layers {numbers} on pipeline stage {groups.pp_rank}; "
                           f"dist_lora's stage map expects {expected}")
