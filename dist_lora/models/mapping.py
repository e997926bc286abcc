"""Which Megatron parameter of this rank is made of which HF tensors (from the family table)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_lora.models.families import WeightEntry
from dist_lora.models.spec import ModelSpec


@dataclass(frozen=True)
class BoundEntry:
    """A table entry bound to one layer: the local Megatron name and the HF tensor names."""

    local_name: str
    hf_names: tuple[str, ...]
    layout: str
    entry: WeightEntry


def bind(spec: ModelSpec, params: dict[str, torch.nn.Parameter], pp_rank: int, pp_size: int) -> list[BoundEntry]:
    """Entries for the parameters present in ``params`` (this rank's stage), in table order."""
    layers = spec.layers_of_stage(pp_rank, pp_size)
    bound = []
    for entry in spec.family.weights:
        if entry.when is not None and entry.when not in spec.features:
            continue
        pairs = ([(entry.megatron.format(layer=g - layers.start), g) for g in layers]
                 if entry.per_layer else [(entry.megatron, None)])
        for local, global_layer in pairs:
            if local not in params:
                continue
            hf = tuple(n.format(layer=global_layer) for n in entry.hf)
            bound.append(BoundEntry(local, hf, entry.layout, entry))
    return bound


def check_coverage(bound: list[BoundEntry], params: dict[str, torch.nn.Parameter]) -> None:
    """Every parameter of the model must come from the checkpoint (no uninitialised weights)."""
    missing = sorted(set(params) - {b.local_name for b in bound})
    if missing:
        raise RuntimeError(f"the model has parameters that the family table does not map: {missing}")
