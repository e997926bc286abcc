"""``TorchNorm``: PyTorch's RMSNorm / LayerNorm for Megatron layers, sequence parallel included.

Megatron-Core's ``WrappedTorchNorm`` (its fallback without apex or Transformer Engine) refuses
``sequence_parallel``. A norm is elementwise over the hidden dimension, so it is correct on a
sequence shard [s/p, b, h] as it is; only its weight gradient is a partial sum over the TP group.
We mark the parameters ``sequence_parallel = True``, the attribute Megatron's
``finalize_model_grads`` uses to all-reduce such gradients over TP.
"""

from __future__ import annotations

import torch

from dist_lora.parallel.device import local_device


class TorchNorm:
    """Factory with the signature Megatron's ``build_module`` calls norms with."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        where = dict(dtype=config.params_dtype, device=local_device())  # where the model is built
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, **where)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, **where)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported (RMSNorm, LayerNorm)")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
