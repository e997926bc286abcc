"""The one seam to megatron-core: every ``megatron.core`` import of dist_lora goes through here.

Keeping the imports in one module pins the surface we depend on (megatron-core 0.16.x; newer
releases are allowed) and makes a version change a one-file review.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # megatron-core announces at import that it falls back to torch without apex / Transformer
    # Engine; that fallback is what dist_lora uses on purpose.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.utils import is_layer_window_attention


def local_linear(layer, x, weight):
    """``x W^T`` of a Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` on this rank's
    shard, through the layer's own implementation (``linear_with_frozen_weight`` for a frozen
    weight, which saves only the weight; the gradient-accumulating path otherwise), with no bias
    and no communication: the caller runs the layer's input and output collectives."""
    return layer._forward_impl(input=x, weight=weight, bias=None,
                               gradient_accumulation_fusion=layer.gradient_accumulation_fusion,
                               allreduce_dgrad=False, sequence_parallel=False, tp_group=layer.tp_group,
                               grad_output_buffer=None)


__all__ = [
    "ColumnParallelLinear",
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "GPTModel",
    "MLP",
    "ModuleSpec",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SelfAttention",
    "TransformerBlockSubmodules",
    "TransformerConfig",
    "VocabParallelEmbedding",
    "get_cuda_rng_tracker",
    "get_forward_backward_func",
    "get_gpt_layer_local_spec",
    "is_layer_window_attention",
    "local_linear",
    "model_parallel_cuda_manual_seed",
    "parallel_state",
]
