"""Which parameters train: exactly the active adapters' tensors, plus the base biases their
``bias`` setting names (``"all"``: every bias; ``"lora_only"``: the biases of adapted layers,
and only the adapted projections' rows of a fused bias)."""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adapters.registry import AdapterRegistry, adapter_layers, registry, saved_modules, wrappers


def refresh(model: nn.Module) -> None:
    """Apply the registry's active set to every wrapper and make exactly the active adapters'
    parameters (plus biases chosen by ``bias``) trainable."""
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
    modes = {reg.configs[a].bias for a in reg.active}
    if "all" in modes:
        for name, param in model.named_parameters():
            if name.endswith(".bias") and ".lora." not in name and ".copies." not in name:
                param.requires_grad_(True)
    for _, layer in adapter_layers(model):
        handle = getattr(layer, "_bias_mask_hook", None)
        if handle is not None:
            handle.remove()
            layer._bias_mask_hook = None
        bias = getattr(layer.base_layer, "bias", None)
        if "lora_only" not in modes or "all" in modes or bias is None:
            continue
        slots = [layer.slots[k] for a in reg.active if reg.configs[a].bias == "lora_only"
                 for k in layer.factors_of(a)]
        if not slots:
            continue
        bias.requires_grad_(True)
        if all(s.rows is not None for s in slots):  # only some projections of a fused bias
            mask = torch.zeros_like(bias)
            for s in slots:
                mask[s.rows] = 1
            layer._bias_mask_hook = bias.register_hook(lambda grad, mask=mask: grad * mask)
