"""A layer's routed experts as Hugging Face tensors again: gathered over ETP, then over EP.

Expert ``e`` of a layer lives on expert-parallel rank ``e // (E / ep)``, split over its
expert-tensor-parallel group like a dense layer over TP (``linear_fc1`` rows ``[gate_i; up_i]``,
``linear_fc2`` columns ``i``); the replicas of an expert shard form its expert-data-parallel
group. To write the checkpoint, replica 0 of every expert (EDP rank 0) takes part: each ETP group
gathers its expert to ETP rank 0, and ETP rank 0 of every expert-parallel rank sends its experts
to EP rank 0, the writer of the stage (global rank 0 of the stage, also TP rank 0 and DP rank 0).
The tensors are the checkpoint's per-expert ones (transformers' default ``save_pretrained``
format: Mixtral's ``block_sparse_moe.experts.{e}.w1`` ...), for every expert of the model.
"""

from __future__ import annotations

import torch

from dist_lora.models.layouts import unshard
from dist_lora.models.mapping import BoundEntry
from dist_lora.parallel.collectives import gather_to
from dist_lora.parallel.groups import ParallelGroups


def expert_units(bound: list[BoundEntry]) -> list[list[BoundEntry] | BoundEntry]:
    """``bound`` in order, the routed experts of one (entry, layer) collected into one unit."""
    units: list = []
    index: dict[tuple, list[BoundEntry]] = {}
    for item in bound:
        if item.expert is None:
            units.append(item)
            continue
        key = (item.entry, item.layer)
        if key not in index:
            index[key] = []
            units.append(index[key])
        index[key].append(item)
    return units


def _names(unit: list[BoundEntry], expert: int) -> tuple[str, ...]:
    return tuple(n.format(layer=unit[0].layer, expert=expert) for n in unit[0].entry.hf)


def expert_meta(unit: list[BoundEntry], params: dict, spec, groups: ParallelGroups) -> list[tuple[str, int]]:
    """(HF name, bytes) of every expert's tensors of this unit, in expert order."""
    param = params[unit[0].local_name]
    shard = torch.empty(param.shape, device="meta")
    fulls = unshard(unit[0].layout, [shard] * groups.etp_size, spec)
    out = []
    for expert in range(spec.experts.num_experts):
        out += [(n, t.numel() * param.element_size()) for n, t in zip(_names(unit, expert), fulls)]
    return out


def gather_experts(unit: list[BoundEntry], params: dict, spec, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Collective over the expert groups of this rank's replica 0 (EDP rank 0; other replicas
    return at once): every expert's full HF tensors of this unit on the stage's writer (EP and
    ETP rank 0), an empty dict elsewhere."""
    if groups.edp_rank != 0:
        return {}
    per_expert = []  # this EP rank's experts, each the list of its full HF tensors
    for item in sorted(unit, key=lambda i: i.expert):
        shards = gather_to(params[item.local_name].detach(), 0, groups.etp_group)
        per_expert.append(None if shards is None else unshard(item.layout, shards, spec))
    if groups.etp_rank != 0:
        return {}
    count = len(unit[0].entry.hf)
    stacked = [torch.stack([tensors[k] for tensors in per_expert]) for k in range(count)]
    gathered = [gather_to(t, 0, groups.ep_group) for t in stacked]
    if gathered[0] is None:
        return {}
    out = {}
    for k in range(count):
        for expert, tensor in enumerate(torch.cat(gathered[k])):
            out[_names(unit, expert)[k]] = tensor
    return out
