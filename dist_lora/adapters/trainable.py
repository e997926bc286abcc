"""Which parameters train: exactly the active adapters' tensors (with ``bias="lora_only"`` their
own copies of the adapted rows of the base biases), plus, with ``bias="all"``, every base bias
(:mod:`dist_lora.adapters.biases`)."""

from __future__ import annotations

from torch import nn

from dist_lora.adapters.biases import all_trained_biases
from dist_lora.adapters.registry import AdapterRegistry, adapter_layers, registry, saved_modules, wrappers


def refresh(model: nn.Module) -> None:
    """Apply the registry's active set to every wrapper and make exactly the active adapters'
    parameters (plus the base biases ``bias="all"`` trains) trainable."""
    reg = registry(model)
    for _, module in wrappers(model):
        module.set_active(reg.active)
        module.disabled = reg.disabled
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for adapter in reg.active:
            for factors in layer.factors_of(adapter).values():
                for param in factors.parameters():
                    param.requires_grad_(True)
    for _, module in saved_modules(model):
        for adapter in reg.active:
            if adapter in module.copies:
                module.copies[adapter].requires_grad_(True)
    _refresh_biases(model, reg)


def _refresh_biases(model: nn.Module, reg: AdapterRegistry) -> None:
    """``bias="all"``: the base biases of :func:`dist_lora.adapters.biases.trained_biases`.
    (``"lora_only"`` trains the slots' own ``trained_bias`` rows, which are factor parameters.)"""
    for param in all_trained_biases(model, reg.active):
        param.requires_grad_(True)
