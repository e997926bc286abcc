"""``Journal``: the undo log of one change to a model's adapters.

Adding an adapter changes a model in place: wrappers replace base layers, factors join
wrappers, saved-module copies are made, weight-driven initialisations (PiSSA, OLoRA, LoftQ)
rewrite base weight rows, the registry and the trainable flags change. Every such change goes
through a journal, so :meth:`Journal.rollback` can put the model back *exactly* as it was (the
same module objects, the same tensors and values, the same flags) when any rank fails.

Memory: a base tensor is copied (to host memory) the first time a change is about to overwrite
it, so a rollback costs at most one host copy of the rewritten shards.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dist_lora.adapters import registry
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.modules_to_save import ModulesToSave


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class Journal:
    """Records changes to ``model`` as they are made and undoes them in reverse order."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._undo: list[Callable[[], None]] = []
        self._kept: set[int] = set()
        self._registry = registry.snapshot(model)
        self._trainable = [(p, p.requires_grad) for p in model.parameters()]

    def set_module(self, path: str, module: nn.Module) -> None:
        """Put ``module`` at ``path`` (a wrapper around the module there)."""
        old = self.model.get_submodule(path)
        set_module(self.model, path, module)
        self._undo.append(lambda: set_module(self.model, path, old))

    def add_factors(self, layer: AdapterLayer, adapter: str, slot_key: str, factors: LoraFactors) -> None:
        new_adapter = adapter not in layer.lora
        layer.add_factors(adapter, slot_key, factors)

        def undo() -> None:
            del layer.lora[adapter][slot_key]
            if new_adapter:
                del layer.lora[adapter]
        self._undo.append(undo)

    def add_copy(self, module: ModulesToSave, adapter: str, weight: torch.Tensor) -> None:
        module.add_copy(adapter, weight)
        self._undo.append(lambda: module.copies.pop(adapter))

    def keep(self, tensor: torch.Tensor) -> None:
        """Save ``tensor``'s values before they are overwritten (once per tensor)."""
        if id(tensor) in self._kept:
            return
        self._kept.add(id(tensor))
        saved = tensor.detach().to("cpu", copy=True)
        self._undo.append(lambda: tensor.data.copy_(saved.to(tensor.device)))

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Register an undo action for a change made by other means."""
        self._undo.append(undo)

    @torch.no_grad()
    def rollback(self, refresh: Callable[[nn.Module], None]) -> None:
        """Undo every recorded change; ``refresh`` re-applies the restored registry's trainable
        set (called only if the model had adapters before)."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        registry.restore(self.model, self._registry)
        if self._registry is not None:
            refresh(self.model)
        for param, flag in self._trainable:
            param.requires_grad_(flag)
