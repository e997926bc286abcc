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
    from megatron.core.transformer.moe import moe_utils as _moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.utils import is_layer_window_attention

# megatron-core 0.16's router gating reads ``te_general_gemm``, which its module defines only when
# Transformer Engine imports; without it the name is missing (NameError) instead of ``None``, the
# value that selects its torch fallback. Define it as that fallback, CUDA or not.
if not hasattr(_moe_utils, "te_general_gemm"):
    _moe_utils.te_general_gemm = None

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
    "TopKRouter",
    "TransformerConfig",
    "VocabParallelEmbedding",
    "get_cuda_rng_tracker",
    "get_forward_backward_func",
    "get_gpt_layer_local_spec",
    "is_layer_window_attention",
    "model_parallel_cuda_manual_seed",
    "parallel_state",
]
