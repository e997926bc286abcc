"""``ModulesToSave``: a fully trained copy of a module per adapter (PEFT's ``modules_to_save``).

The original weight stays frozen; each adapter gets its own trainable copy of the local shard
(for a vocab-parallel output layer: [V/p, h], split like the base). When an adapter with a copy
is active, the copy replaces the weight in forward; with several active adapters the first one
that has a copy is used, as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_lora.layers.sharding import BaseShard, FactorLayout
from dist_lora.layers.wrapper import BaseWrapper


class ModulesToSave(BaseWrapper):
    def __init__(self, base_layer: nn.Module, shard: BaseShard, layout: FactorLayout):
        super().__init__()
        self.base_layer = base_layer
        self.shard = shard
        self.layout = layout  # of the weight copy, global [out, in]
        self.copies = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_copy(self, adapter: str, weight: torch.Tensor) -> None:
        if getattr(self.base_layer, "bias", None) is not None:
            raise ValueError("modules_to_save on a layer with a bias is not supported")
        self.copies[adapter] = nn.Parameter(weight.detach().clone())

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def delete_adapter(self, adapter: str) -> None:
        del self.copies[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def set_active(self, adapters: list[str]) -> None:
        self.active_adapters = [a for a in adapters if a in self.copies]

    def current(self) -> torch.Tensor | None:
        if self.disabled or not self.active_adapters:
            return None
        return self.copies[self.active_adapters[0]]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        weight = self.current()
        if weight is None:
            return self.base_layer(x, *args, **kwargs)
        if self.shard.megatron:
            kwargs["weight"] = weight
            return self.base_layer(x, *args, **kwargs)
        if isinstance(self.base_layer, nn.Embedding):
            b = self.base_layer
            return F.embedding(x, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        return F.linear(x, weight)
