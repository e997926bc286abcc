"""The base biases an adapter trains, with the names PEFT gives them and how they are sharded.

``bias="all"`` trains every bias of the model, as PEFT does; this module is the one list of
them, used to make them trainable (:mod:`dist_lora.adapters.trainable`) and to export, check
point and load them (:mod:`dist_lora.checkpoint.state_dict`, :mod:`dist_lora.checkpoint.entries`),
so what trains is exactly what travels:

* the bias of every adapter wrapper's base layer (on a Megatron model every bias the family
  table maps: ``apply_lora`` wraps each of them for ``bias="all"``, see
  :func:`dist_lora.adapters.lora.plan_lora`), sharded like the layer's output on column layers
  (one tensor over the fused q / k / v rows of ``linear_qkv``) and replicated on row layers;
* on a plain model, also the bias of every other module, named by its module path.

``bias="lora_only"`` trains no base bias: each adapted slot trains its own copy of the bias rows
it covers (``LoraFactors.trained_bias``), so the rows of projections it does not adapt (k's
rows of a fused q / k / v bias under q / v adapters) are in no trainable tensor at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, registry, wrappers
from dist_lora.layers.sharding import REPLICATED, FactorLayout


@dataclass(frozen=True)
class TrainedBias:
    """One trained base bias: this rank's shard and what its export needs."""

    param: nn.Parameter  # local shard
    global_name: str  # layout-independent module name (Megatron name with global layer index, or path)
    hf_names: tuple[str, ...]  # the HF modules whose biases it holds (q, k, v for linear_qkv)
    fused: str | None  # models.layouts name of a fused bias
    layout: FactorLayout  # split over TP
    tp_group: Any
    tp: int
    rank: int
    adapted: tuple[str, ...]  # HF modules among ``hf_names`` that carry the adapter

    @property
    def global_shape(self) -> tuple[int, ...]:
        rows = self.param.shape[0] * (self.tp if self.layout.dim == 0 else 1)
        return (rows,)


def trained_biases(model: nn.Module, adapter: str) -> list[TrainedBias]:
    """The base biases ``adapter`` trains on this rank (empty unless its ``bias`` is ``"all"``)."""
    if registry(model).configs[adapter].bias != "all":
        return []
    out, inside = [], []
    for path, layer in adapter_layers(model):
        inside.append(path + ".")
        bias = getattr(layer.base_layer, "bias", None)
        if bias is None:
            continue
        shard = layer.shard
        adapted = tuple(dict.fromkeys(n for f in layer.factors_of(adapter).values() for n in f.slot.hf_names))
        # dim 0 on column layers at every TP size, so a checkpoint's manifest reshards it
        layout = FactorLayout(dim=0) if shard.kind == "column" else REPLICATED
        out.append(TrainedBias(bias, layer.global_name, layer.hf_names, layer.fused_layout, layout,
                               shard.tp_group, shard.tp, shard.rank, adapted))
    inside += [path + "." for path, _ in wrappers(model)]
    if view(model).megatron:
        return out
    for path, module in model.named_modules():
        bias = module._parameters.get("bias")
        if bias is None or any(path.startswith(w) for w in inside):
            continue
        out.append(TrainedBias(bias, path, (path,), None, REPLICATED, None, 1, 0, ()))
    return out


def all_trained_biases(model: nn.Module, adapters: list[str]) -> list[nn.Parameter]:
    """The distinct base bias parameters that any of ``adapters`` trains on this rank."""
    params = {id(b.param): b.param for a in adapters for b in trained_biases(model, a)}
    return list(params.values())
