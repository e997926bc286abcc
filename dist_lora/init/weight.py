"""Read a slot's base-weight shard, run a weight-driven initialisation, write A, B and the base.

Layouts (TP size p, slot weight ``W`` [m, n]):

* column-parallel (q/k/v, gate/up, any ``ColumnParallelLinear``): each rank holds rows
  ``W_i`` [m/p, n] (for a projection of a fused layer, only that projection's rows of the
  fused shard); ``lora_B`` is row-sharded like ``W``, ``lora_A`` replicated.
* row-parallel (o_proj, down_proj): each rank holds columns ``W_i`` [m, n/p]; ``lora_A`` is
  column-sharded like ``W``, ``lora_B`` replicated.

Every method returns factors in exactly these layouts, so nothing is scattered afterwards, and
the new base shard (PiSSA / OLoRA: ``W_i - scaling * (B A)_i``; LoftQ: the dequantised
4-bit weight) is written over the local rows of the slot only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_lora.config.init_names import weight_method
from dist_lora.init.loftq import check_loftq
from dist_lora.init.methods import FROM_WEIGHT


@dataclass(frozen=True)
class ShardedWeight:
    """One rank's shard of a slot's global weight ``W`` [m, n] in float32.

    ``dim``: 0 rows sharded, 1 columns sharded, ``None`` whole (TP size 1). ``col_offset``:
    global index of the first local column (column shards)."""

    local: torch.Tensor
    dim: int | None
    group: Any
    col_offset: int = 0


def _sharded_weight(module, slot) -> ShardedWeight:
    shard = module.shard
    local = module._read_rows(slot).detach().float()
    dim = None if shard.tp == 1 else (1 if shard.kind == "row" else 0)
    return ShardedWeight(local, dim, shard.tp_group, shard.rank * local.shape[1] if dim == 1 else 0)


def check_weight_init(config, candidate, shard, r: int) -> None:
    """Raise ``ValueError`` if ``config.init_lora_weights`` cannot initialise ``candidate``
    (called before the model is touched)."""
    method = weight_method(config.init_lora_weights)
    if method is None:
        return
    name, what = method[0], f"init_lora_weights={config.init_lora_weights!r}"
    if candidate.kind != "linear" or shard.kind == "embedding":
        raise ValueError(f"{what} is not supported on embedding / output layers ({candidate.hf_name}); "
                         f"leave it out of target_modules")
    if candidate.slot.fused is not None:
        projections = ", ".join(n.rsplit(".", 1)[1] for n in candidate.slot.hf_names)
        raise ValueError(f"{what} on the fused {candidate.global_name} would decompose the stacked weight, "
                         f"which PEFT never does; target the projections ({projections}) instead")
    if r > min(candidate.slot.out_features, shard.in_features):
        raise ValueError(f"{what}: r={r} exceeds the smaller side of {candidate.hf_name}'s weight "
                         f"[{candidate.slot.out_features}, {shard.in_features}]; lower r")
    if name == "loftq":
        local_in = shard.in_features // shard.tp if shard.kind == "row" else shard.in_features
        check_loftq(config, candidate.hf_name, local_in)


@torch.no_grad()
def initialise_from_weight(module, factors, slot, config, generator: torch.Generator) -> None:
    """Overwrite ``factors``' A and B with the weight-driven initialisation of ``slot`` and write
    the new base rows. Collective over the layer's TP group (all TP ranks call it in the same
    order)."""
    name, niter = weight_method(config.init_lora_weights)
    weight = _sharded_weight(module, slot)
    a, b, base = FROM_WEIGHT[name](weight, factors.r, factors.scaling, niter, generator, config)
    factors.lora_A.copy_(a)
    factors.lora_B.copy_(b)
    module._write_rows(slot, base.to(module.base_weight().dtype))
