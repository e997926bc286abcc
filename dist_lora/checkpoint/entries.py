"""The tensors of one adapter on this rank, each with a layout-independent key and its sharding.

Keys are ``<global module name>.<slot>.<role>`` (e.g.
``decoder.layers.3.self_attention.linear_qkv.q_proj.lora_A``), ``<module>.modules_to_save`` and
``<module>.base_bias``; the global module name uses the *global* layer index, so a key means
the same tensor at any TP / PP layout. ``describe`` carries what is needed to export the tensor
to PEFT's names without a model: HF module names, fused layout, embedding or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_lora.adapters.registry import adapter_layers, registry, saved_modules
from dist_lora.layers.sharding import FactorLayout


@dataclass
class Entry:
    key: str
    param: torch.Tensor  # local shard (a view of the rank-r part of a parameter padded for hotswapping)
    layout: FactorLayout
    shape: tuple[int, ...]  # global (unpadded) shape
    tp: int
    rank: int
    role: str  # lora_A | lora_B | lora_bias | lora_magnitude_vector | modules_to_save | base_bias
    hf_names: tuple[str, ...]
    fused: str | None
    kind: str  # linear | embedding
    adapted: tuple[str, ...] = ()  # for base_bias: HF modules that carry this adapter
    alpha: float | None = None  # lora_alpha of the slot (LoRA tensors)

    def describe(self) -> dict:
        return {"shape": list(self.shape), "dim": self.layout.dim, "stride": self.layout.stride,
                "size": self.layout.size, "dtype": str(self.param.dtype).replace("torch.", ""),
                "role": self.role, "hf_names": list(self.hf_names), "fused": self.fused, "kind": self.kind,
                "adapted": list(self.adapted), "alpha": self.alpha}


def is_training_state(role: str) -> bool:
    """Whether a manifest ``role`` is training state stored like a parameter (key
    ``<param key>.<role>``, role ``optim.<name>`` or a method's ``<namespace>.<name>``, e.g.
    ``adalora.sensitivity``) rather than an adapter tensor (adapter roles have no dot)."""
    return "." in role


def entries(model: nn.Module, adapter: str) -> list[Entry]:
    """This rank's tensors of ``adapter`` (parameters, not copies)."""
    out = []
    for _, layer in adapter_layers(model):
        kind = "embedding" if layer.shard.kind == "embedding" else "linear"
        slots = layer.factors_of(adapter)
        for slot_key, factors in slots.items():
            if factors.vacant:  # a hotswapped adapter that does not target this slot
                continue
            shapes = factors.global_shapes(layer.shard)
            for role, layout in factors.layouts().items():
                out.append(Entry(f"{layer.global_name}.{slot_key}.{role}", factors.held(role), layout,
                                 shapes[role], layer.shard.tp, layer.shard.rank, role, factors.slot.hf_names,
                                 factors.slot.fused, kind, alpha=factors.alpha))
        bias = getattr(layer.base_layer, "bias", None)
        mode = registry(model).configs[adapter].bias
        if bias is not None and (mode == "all" or (mode == "lora_only" and slots)):
            layout = FactorLayout(dim=0) if layer.shard.kind == "column" else FactorLayout()
            full = (bias.shape[0] * layer.shard.tp,) if layout.dim == 0 else tuple(bias.shape)
            adapted = tuple(dict.fromkeys(n for f in slots.values() for n in f.slot.hf_names))
            out.append(Entry(f"{layer.global_name}.base_bias", bias, layout, full, layer.shard.tp,
                             layer.shard.rank, "base_bias", layer.hf_names, layer.fused_layout, kind, adapted))
    for _, module in saved_modules(model):
        if adapter in module.copies:
            param = module.copies[adapter]
            layout = module.layout
            rows = layout.size if layout.size is not None else param.shape[0] * (module.shard.tp if layout.dim == 0 else 1)
            out.append(Entry(f"{module.global_name}.modules_to_save", param, layout, (rows, *param.shape[1:]),
                             module.shard.tp, module.shard.rank, "modules_to_save", (module.hf_name,), None, "linear"))
    return out
