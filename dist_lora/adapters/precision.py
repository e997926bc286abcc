"""Which dtype and device an adapter's tensors take (mixed precision, the device seam).

**dtype** (``adapter_dtype`` of :func:`dist_lora.apply_lora`, :func:`dist_lora.add_adapter`,
:func:`dist_lora.apply_adalora` and the recipe's ``train.adapter_dtype``):

* ``None`` / ``"float32"`` (default): float32 factors on a bfloat16 / float16 base, as PEFT's
  ``autocast_adapter_dtype=True`` and Megatron's fp32 main parameters; a float32 base keeps
  float32. The optimizer then steps float32 adapters, and small updates are not lost to
  bfloat16 rounding.
* ``"base"``: the base's dtype (half the adapter memory and optimizer traffic of float32 on a
  bfloat16 base; updates round to bfloat16).
* a floating ``torch.dtype`` (or its name, ``"bfloat16"``): exactly that.

The forward contract per adapted layer (:mod:`dist_lora.layers.linear`, ``embedding``): the
base runs in its own dtype; the layer input is cast once to the adapter dtype; the adapter path
(dropout, A, B, DoRA's scale) runs there; DoRA's weight norm is computed in float32; the sum
``base + delta`` is formed in the wider dtype and rounded to the base dtype once.

**device**: the device of the weight the adapter is attached to (a tied output layer reads the
embedding's weight, a 4-bit base its packed bytes).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.parallel.device import module_device

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
HALF = (torch.float16, torch.bfloat16)


def check_adapter_dtype(requested) -> None:
    """Raise unless ``requested`` is ``None``, ``"base"``, a floating dtype or its name."""
    if requested is None or requested == "base" or requested in _NAMES:
        return
    if isinstance(requested, torch.dtype) and requested.is_floating_point:
        return
    raise ValueError(f"adapter_dtype={requested!r} is not supported; use None / 'float32' (float32 adapters on a "
                     f"half-precision base), 'base' (the base's dtype) or a floating torch.dtype "
                     f"({', '.join(_NAMES)})")


def resolve_dtype(requested, base_dtype: torch.dtype | None) -> torch.dtype:
    """The adapter dtype for ``requested`` (module docstring) on a base of ``base_dtype``."""
    check_adapter_dtype(requested)
    base_dtype = torch.float32 if base_dtype is None else base_dtype
    if requested is None:
        return torch.float32 if base_dtype in HALF else base_dtype
    if requested == "base":
        return base_dtype
    return _NAMES[requested] if isinstance(requested, str) else requested


def base_dtype_and_device(model: nn.Module, base: nn.Module) -> tuple[torch.dtype | None, torch.device]:
    """The dtype the base layer computes in and the device its weight lives on."""
    if getattr(base, "quantized", False):  # 4-bit base: its compute dtype, where its bytes are
        return base.compute_dtype, base.weight_packed.device
    weight = getattr(base, "weight", None)
    if weight is None and hasattr(model, "shared_embedding_or_output_weight"):
        weight = model.shared_embedding_or_output_weight()  # tied Megatron output layer
    if weight is None:
        return None, module_device(base)
    return weight.dtype, weight.device


def placement(model: nn.Module, base: nn.Module, requested=None) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of new adapter tensors on the layer ``base`` of ``model``."""
    dtype, device = base_dtype_and_device(model, base)
    return resolve_dtype(requested, dtype), device
