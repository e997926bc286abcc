"""Build an (empty) Megatron-Core ``GPTModel`` for this rank's TP shard and PP stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.integrations.megatron import (
    GPTModel,
    TransformerBlockSubmodules,
    TransformerConfig,
    get_gpt_layer_local_spec,
)
from dist_lora.integrations.megatron_cpu import cpu_device_mode
from dist_lora.models.norm import TorchNorm
from dist_lora.models.spec import ModelSpec
from dist_lora.parallel import ParallelGroups


DISPATCHERS = ("alltoall", "allgather")


def _expert_settings(spec: ModelSpec, groups: ParallelGroups, dispatcher: str) -> dict:
    """Megatron's MoE settings for the family's routing (see :mod:`dist_lora.models.experts`):
    sequential local experts, no load-balancing term of Megatron's own (the family's auxiliary
    loss, when trained, is :mod:`dist_lora.models.router_loss`), no token dropping."""
    experts = spec.experts
    if experts is None:
        return {}
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"moe_token_dispatcher={dispatcher!r}: use one of {', '.join(DISPATCHERS)}")
    return dict(num_moe_experts=experts.num_experts, moe_router_topk=experts.top_k,
                moe_ffn_hidden_size=experts.ffn_hidden_size, moe_router_pre_softmax=not experts.renormalise,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type=dispatcher,
                moe_grouped_gemm=False, expert_model_parallel_size=groups.ep_size,
                expert_tensor_parallel_size=groups.etp_size)


def transformer_config(spec: ModelSpec, groups: ParallelGroups, dtype: torch.dtype,
                       dispatcher: str = "alltoall") -> TransformerConfig:
    """Megatron ``TransformerConfig`` equivalent to the HF config (dropout off, no fusions)."""
    window = None if spec.sliding_window is None else (spec.sliding_window - 1, 0)
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=groups.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
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
        window_size=window,
        **_expert_settings(spec, groups, dispatcher),
    )


def build_gpt(spec: ModelSpec, groups: ParallelGroups, dtype: torch.dtype, dispatcher: str = "alltoall") -> GPTModel:
    """A ``GPTModel`` with this stage's layers; weights are uninitialised until loaded.
    Mixture-of-experts families get Megatron's ``MoELayer`` with ``dispatcher`` routing tokens."""
    config = transformer_config(spec, groups, dtype, dispatcher)
    experts = spec.experts.num_experts if spec.experts is not None else None
    layer = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, normalization="RMSNorm",
                                     qk_layernorm=spec.family.qk_norm)
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    if spec.family.qk_norm:  # applied per head over head_dim: [s, b, heads/p, head_dim]
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = TorchNorm
        attention.k_layernorm = TorchNorm
    stage_layers = len(spec.layers_of_stage(groups.pp_rank, groups.pp_size))
    block = TransformerBlockSubmodules(layer_specs=[layer] * stage_layers, layer_norm=TorchNorm)
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
    return model
