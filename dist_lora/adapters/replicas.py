"""``check_replicas``: prove that replicated adapter tensors are still identical everywhere.

Replicated factors (``lora_A`` of column layers, ``lora_B`` and DoRA magnitudes of row layers,
``lora_embedding_B``) must be equal on every TP rank, and every adapter tensor must be equal on
every data-parallel replica. A silent divergence means each rank trains a different adapter.
"""

from __future__ import annotations

from torch import nn

from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, saved_modules
from dist_lora.parallel.collectives import all_equal_tensors, raise_if_any


def check_replicas(model: nn.Module) -> None:
    """Collective over the job: hash replicated tensors across TP and DP; raise on every rank,
    naming the first parameter that differs, if any does."""
    tp_named, dp_named, tp_group = [], [], None
    for name, layer in adapter_layers(model):
        for adapter, slots in layer.lora.items():
            for key, factors in slots.items():
                for tensor_name, layout in factors.layouts().items():
                    full_name = f"{name}.lora.{adapter}.{key}.{tensor_name}"
                    param = getattr(factors, tensor_name)
                    dp_named.append((full_name, param))
                    if layout.dim is None and layer.shard.tp > 1:
                        tp_named.append((full_name, param))
                        tp_group = layer.shard.tp_group
    for name, module in saved_modules(model):
        dp_named += [(f"{name}.copies.{a}", p) for a, p in module.copies.items()]
    error = None
    dp_group = view(model).dp_group
    checks = [("tensor-parallel", tp_named, tp_group)] if tp_named else []
    if dp_group is not None:
        checks.append(("data-parallel", dp_named, dp_group))
    for what, named, group in checks:
        same = all_equal_tensors([p for _, p in named], group)
        if not all(same) and error is None:
            first = named[same.index(False)][0]
            error = RuntimeError(f"{first} differs between {what} replicas")
    raise_if_any(error, what="check_replicas")
