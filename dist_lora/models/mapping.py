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
    expert: int | None = None  # a routed expert's global index
    layer: int | None = None  # the global layer index

    def fused_source(self) -> tuple[tuple[str, ...], str]:
        """transformers' fused (in-memory format) names and layout of this entry: for a routed
        expert, the [E, ...] tensors of which it is slice ``expert``."""
        names, layout = self.entry.fused
        return tuple(n.format(layer=self.layer) for n in names), layout


def bind(spec: ModelSpec, params: dict[str, torch.nn.Parameter], pp_rank: int, pp_size: int,
         ep_rank: int = 0, ep_size: int = 1) -> list[BoundEntry]:
    """Entries for the parameters present in ``params`` (this rank's stage and, for routed experts,
    its expert-parallel rank's experts), in table order."""
    layers = spec.layers_of_stage(pp_rank, pp_size)
    experts = spec.experts.local_experts(ep_size, ep_rank) if spec.experts is not None else range(0)
    bound = []
    for entry in spec.family.weights:
        if entry.when is not None and entry.when not in spec.features:
            continue
        for g in (layers if entry.per_layer else [None]):
            local_layer = None if g is None else g - layers.start
            for e in (experts if entry.per_expert else [None]):
                local_expert = None if e is None else e - experts.start
                local = entry.megatron.format(layer=local_layer, expert=local_expert)
                if local in params:
                    hf = tuple(n.format(layer=g, expert=e) for n in entry.hf)
                    bound.append(BoundEntry(local, hf, entry.layout, entry, e, g))
    return bound


def check_coverage(bound: list[BoundEntry], params: dict[str, torch.nn.Parameter]) -> None:
    """Every parameter of the model must come from the checkpoint (no uninitialised weights)."""
    missing = sorted(set(params) - {b.local_name for b in bound})
    if missing:
        raise RuntimeError(f"the model has parameters that the family table does not map: {missing}")
