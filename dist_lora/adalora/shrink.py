"""``shrink_to_rank_pattern``: cut each AdaLoRA layer down to its learned rank, physically.

After the schedule has fixed ``rank_pattern`` (``update_and_allocate`` at ``total_step - tfinal``),
pruned triplets are zeros that still cost memory, optimizer state and FLOPs. Shrinking keeps only
the kept rows of Q (``lora_A`` [r, in_local]) and Lambda, and the kept columns of P (``lora_B``
[out_local, r]) on every rank: the rank dimension is never split over TP, so no communication.
The output is unchanged (``ranknum`` and the scaling stay those of ``init_r``, as in PEFT's
``resize_modules_by_rank_pattern``). The parameters are new tensors: build the optimizer again.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adalora.layers import adalora_config, svd_factors
from dist_lora.parallel.agreement import raise_if_any


@torch.no_grad()
def shrink_to_rank_pattern(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Shrink every AdaLoRA slot to its kept triplets; returns {HF module: new rank} (local modules)."""
    config = adalora_config(model, adapter_name)
    error = None if config.rank_pattern is not None else RuntimeError(
        "no rank_pattern yet: shrink after update_and_allocate has run at total_step - tfinal")
    raise_if_any(error, what="shrink_to_rank_pattern")
    ranks = {}
    for name, _, f in svd_factors(model, adapter_name):
        flags = config.rank_pattern[f"{name}.lora_E"]
        if len(flags) == f.r:  # not shrunk yet
            keep = torch.tensor(flags, dtype=torch.bool, device=f.lora_E.device).nonzero().view(-1)
            for role, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                old = getattr(f, role)
                setattr(f, role, nn.Parameter(old.index_select(dim, keep).clone(), requires_grad=old.requires_grad))
            f.set_rank(int(keep.numel()))  # capacity too: the forward splits hiddens by it
        ranks[name] = f.r
    return ranks
