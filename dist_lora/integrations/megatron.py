"""The one seam to megatron-core: every ``megatron.core`` import of dist_lora goes through here.

Keeping the imports in one module pins the surface we depend on and makes a version change a
one-file review. Supported: megatron-core 0.16.1 to 0.19.x (``pyproject.toml``:
``>=0.16.1,<0.20``). CI runs the suite on 0.16.1 with Python 3.11 (the newest release for 3.11)
and on 0.19.2 with Python 3.12; 0.17.1 and 0.18.2 passed it unchanged on Python 3.12. The one
difference that matters here: 0.19's data-parallel bucket sync reads
``torch.cuda.current_stream()``, which :mod:`dist_lora.integrations.megatron_cpu` answers on
CPU. Another version imports with a warning naming the tested range.
"""

from __future__ import annotations

import importlib.metadata
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
    from megatron.core.tensor_parallel.random import _DATA_PARALLEL_RNG_TRACKER_NAME as DATA_PARALLEL_RNG
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME as MODEL_PARALLEL_RNG
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe import moe_utils as _moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.utils import is_layer_window_attention

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [lowest, first unsupported)
TESTED = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")


def version() -> tuple[int, ...]:
    """The installed megatron-core release as (major, minor, patch)."""
    text = importlib.metadata.version("megatron-core")
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


if not SUPPORTED[0] <= version() < SUPPORTED[1]:
    warnings.warn(f"megatron-core {importlib.metadata.version('megatron-core')} is outside the range dist_lora "
                  f"supports (>=0.16.1,<0.20; tested: {', '.join(TESTED)}): install one of those if anything fails",
                  UserWarning, stacklevel=2)

# megatron-core 0.16's router gating reads ``te_general_gemm``, which its module defines only when
# Transformer Engine imports; without it the name is missing (NameError) instead of ``None``, the
# value that selects its torch fallback. Define it as that fallback, CUDA or not.
if not hasattr(_moe_utils, "te_general_gemm"):
    _moe_utils.te_general_gemm = None


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
    "DATA_PARALLEL_RNG",
    "MODEL_PARALLEL_RNG",
    "SUPPORTED",
    "TESTED",
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
    "local_linear",
    "model_parallel_cuda_manual_seed",
    "parallel_state",
    "version",
]
