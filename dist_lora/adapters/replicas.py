"""``check_replicas``: prove that replicated adapter tensors are still identical everywhere.

Replicated factors (``lora_A`` of column layers, ``lora_B`` and DoRA magnitudes of row layers,
``lora_embedding_B``) must be equal on every TP rank, and every adapter tensor must be equal on
every data-parallel replica. A routed expert's factors are compared over its own groups: the
replicated one over its expert-tensor-parallel group, all of them over its expert-data-parallel
group (the ranks holding the same expert). A silent divergence means each rank trains a
different adapter.
"""

from __future__ import annotations

from torch import nn

from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, saved_modules
from dist_lora.parallel.agreement import all_equal_tensors, raise_if_any


def check_replicas(model: nn.Module) -> None:
    """Collective over the job: hash replicated tensors across TP and DP; raise on every rank,
    naming the first parameter that differs, if any does."""
    seam = view(model)
    tp_named, dp_named, etp_named, edp_named, tp_group, etp_group = [], [], [], [], None, None
    for name, layer in adapter_layers(model):
        expert = getattr(layer, "expert", None) is not None
        for adapter, slots in layer.lora.items():
            for key, factors in slots.items():
                for tensor_name, layout in factors.layouts().items():
                    full_name = f"{name}.lora.{adapter}.{key}.{tensor_name}"
                    param = getattr(factors, tensor_name)
                    (edp_named if expert else dp_named).append((full_name, param))
                    if layout.dim is None and layer.shard.tp > 1:
                        (etp_named if expert else tp_named).append((full_name, param))
                        if expert:
                            etp_group = layer.shard.tp_group
                        else:
                            tp_group = layer.shard.tp_group
    for name, module in saved_modules(model):
        dp_named += [(f"{name}.copies.{a}", p) for a, p in module.copies.items()]
    error = None
    dp_group = seam.dp_group
    checks = [("tensor-parallel", tp_named, tp_group)] if tp_named else []
    if dp_group is not None:
        checks.append(("data-parallel", dp_named, dp_group))
    if seam.groups is not None and seam.groups.etp_size > 1:  # every rank holds experts: the same checks
        checks.append(("expert-tensor-parallel", etp_named, etp_group or seam.groups.etp_group))
    if seam.edp_group is not None:
        checks.append(("expert-data-parallel", edp_named, seam.edp_group))
    for what, named, group in checks:
        same = all_equal_tensors([p for _, p in named], group)
        if not all(same) and error is None:
            first = named[same.index(False)][0]
            error = RuntimeError(f"{first} differs between {what} replicas")
    raise_if_any(error, what="check_replicas")
