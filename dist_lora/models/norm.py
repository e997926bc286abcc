"""``TorchNorm``: PyTorch's RMSNorm / LayerNorm for Megatron layers, sequence parallel included.

Megatron-Core's ``WrappedTorchNorm`` (its fallback without apex or Transformer Engine) refuses
``sequence_parallel``. A norm is elementwise over the hidden dimension, so it is correct on a
sequence shard [s/p, b, h] as it is; only its weight gradient is a partial sum over the TP group.
We mark the parameters ``sequence_parallel = True``, the attribute Megatron's
``finalize_model_grads`` uses to all-reduce such gradients over TP.

Gemma's RMSNorm scales by ``(1 + weight)`` (Megatron's ``layernorm_zero_centered_gamma``), which
only Megatron's apex / Transformer Engine norms implement; :class:`ZeroCenteredRMSNorm` is that
norm in plain torch, computed in float32 as Hugging Face's ``Gemma3RMSNorm`` is.
"""

from __future__ import annotations

import torch


class ZeroCenteredRMSNorm(torch.nn.Module):
    """``x / rms(x) * (1 + weight)`` over the last dimension, in float32, cast back to x's dtype.

    Shapes: x ``[..., hidden]`` -> ``[..., hidden]``; ``weight`` ``[hidden]`` (zeros = identity scale).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class TorchNorm:
    """Factory with the signature Megatron's ``build_module`` calls norms with."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        if config.normalization == "RMSNorm" and zero_centered:
            norm = ZeroCenteredRMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm" and not zero_centered:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {config.normalization!r} (zero-centered: {zero_centered}) is not "
                             f"supported (RMSNorm, zero-centered RMSNorm, LayerNorm)")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm
