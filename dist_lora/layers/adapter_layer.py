"""``AdapterLayer``: what every LoRA wrapper shares — the base layer, its adapters, and their state.

Each adapter (by name) holds one :class:`LoraFactors` per slot it covers. State per layer:
``active_adapters`` (their outputs add up), ``disabled`` (the base alone), ``merged_adapters``
(folded into the base weight, so skipped in forward). Subclasses implement the forward delta
and merge arithmetic for their base kind.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from dist_lora.layers.bias import merge_trained_bias, unmerge_trained_bias
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.sharding import BaseShard
from dist_lora.layers.slots import Slot
from dist_lora.layers.wrapper import BaseWrapper


class AdapterLayer(BaseWrapper):
    """A base layer plus named adapters, each a ``ModuleDict`` slot key -> ``LoraFactors``."""

    def __init__(self, base_layer: nn.Module, shard: BaseShard, slots: dict[str, Slot],
                 hf_names: tuple[str, ...], fused_layout: str | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.shard = shard
        self.slots = slots  # every slot this layer offers
        self.hf_names = hf_names  # the HF modules the base layer stands for, in order
        self.fused_layout = fused_layout  # "qkv" / "glu" for fused Megatron layers
        self.lora = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- bookkeeping ---------------------------------------------------------------------

    def add_factors(self, adapter: str, slot_key: str, factors: LoraFactors) -> None:
        if slot_key not in self.slots:
            raise KeyError(f"slot {slot_key!r} does not exist on this layer (has {sorted(self.slots)})")
        if adapter not in self.lora:
            self.lora[adapter] = nn.ModuleDict()
        if slot_key in self.lora[adapter]:
            raise ValueError(f"adapter {adapter!r} already covers slot {slot_key!r}")
        self.lora[adapter][slot_key] = factors

    def adapter_names(self) -> list[str]:
        return list(self.lora.keys())

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter!r} is merged; unmerge it before deleting")
        del self.lora[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def set_active(self, adapters: list[str]) -> None:
        self.active_adapters = [a for a in adapters if a in self.lora]

    def live(self) -> Iterator[tuple[str, LoraFactors]]:
        """Factors that contribute to forward: active, not merged, adapters not disabled."""
        if self.disabled:
            return
        for adapter in self.active_adapters:
            if adapter in self.merged_adapters:
                continue
            for factors in self.lora[adapter].values():
                yield adapter, factors

    def tp_partial_gradients(self) -> list[nn.Parameter]:
        """Every replicated adapter tensor of this layer whose gradient is a partial sum over TP
        after backward (:meth:`LoraFactors.tp_partial_gradients`); ``finalize_grads`` sums them."""
        return [t for slots in self.lora.values() for factors in slots.values()
                for t in factors.tp_partial_gradients(self.shard)]

    def factors_of(self, adapter: str) -> dict[str, LoraFactors]:
        return dict(self.lora[adapter]) if adapter in self.lora else {}

    # -- merging -------------------------------------------------------------------------

    def merge_candidates(self, adapter: str) -> list[tuple[LoraFactors, torch.Tensor, torch.Tensor | None]]:
        """For each slot of ``adapter``: (factors, merged local weight rows, DoRA norm). No writes."""
        raise NotImplementedError

    def check_mergeable(self, adapter: str) -> None:
        """Raise if ``adapter`` cannot be folded into this layer (checked before any write)."""
        if getattr(self.base_layer, "quantized", False):
            raise RuntimeError(
                f"adapter {adapter!r} cannot be merged into a 4-bit base: the sum would be re-quantised and "
                f"the adapter's update mostly lost. Export the adapter (export_peft) and merge it into the float "
                f"base with `dist-lora merge` (or merge_release)")
        for factors in self.lora[adapter].values():
            self.base_weight()
            if factors.lora_bias is not None and getattr(self.base_layer, "bias", None) is None:
                raise RuntimeError("lora_bias cannot be merged: the base layer has no bias")

    @torch.no_grad()
    def merge(self, adapter: str) -> None:
        """Fold ``adapter`` into the local base weight shard (no gather, no communication
        beyond the DoRA row-norm reduction of row-parallel layers)."""
        if adapter in self.merged_adapters:
            return
        self.check_mergeable(adapter)
        for factors, merged, norm in self.merge_candidates(adapter):
            self._write_rows(factors.slot, merged)
            factors.merged_norm = norm
            if factors.trained_bias is not None:  # first: the rows it replaces are the base's own
                merge_trained_bias(self, factors)
            if factors.lora_bias is not None:
                self._add_to_bias(factors.slot, factors.scaling * factors.lora_bias)
        self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self, adapter: str) -> None:
        if adapter not in self.merged_adapters:
            return
        for factors in self.lora[adapter].values():
            rows = self._read_rows(factors.slot)
            if factors.lora_magnitude_vector is not None:
                rows = rows / (factors.lora_magnitude_vector / factors.merged_norm).unsqueeze(1)
            self._write_rows(factors.slot, rows - self._delta_in_weight_layout(factors))
            factors.merged_norm = None
            if factors.lora_bias is not None:
                self._add_to_bias(factors.slot, -factors.scaling * factors.lora_bias)
            if factors.trained_bias is not None:  # last: the saved rows are exactly the base's
                unmerge_trained_bias(self, factors)
        self.merged_adapters.remove(adapter)

    # -- weight access (subclasses override where the layout differs) --------------------

    def base_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if weight is None:
            raise RuntimeError(
                f"{type(self.base_layer).__name__} has no weight of its own (tied to the embedding); "
                f"merging into a tied output layer would change the embedding too")
        return weight

    def _read_rows(self, slot: Slot) -> torch.Tensor:
        weight = self.base_weight()
        return weight if slot.block is None else weight.index_select(0, slot.rows_on(weight.device))

    def _write_rows(self, slot: Slot, rows: torch.Tensor) -> None:
        weight = self.base_weight()
        if slot.block is None:
            weight.data.copy_(rows)
        else:
            weight.data.index_copy_(0, slot.rows_on(weight.device), rows.to(weight.dtype))

    def _add_to_bias(self, slot: Slot, value: torch.Tensor) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            raise RuntimeError("lora_bias cannot be merged: the base layer has no bias")
        if slot.block is None:
            bias.data.add_(value.to(bias.dtype))
        else:
            bias.data.index_add_(0, slot.rows_on(bias.device), value.to(bias.dtype))

    def _delta_in_weight_layout(self, factors: LoraFactors) -> torch.Tensor:
        """``scaling * B @ A`` laid out like the base weight's rows for this slot."""
        return factors.delta_weight()
