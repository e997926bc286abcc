"""Where a model keeps its adapters: configs, active set, and the wrapper modules holding them.

Adapters are found through their wrapper *types* (``AdapterLayer``, ``ModulesToSave``), never by
matching parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from dist_lora.config.lora import LoraConfig
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.modules_to_save import ModulesToSave

_ATTR = "dist_lora_adapters"


@dataclass
class AdapterRegistry:
    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False


def registry(model: nn.Module, create: bool = False) -> AdapterRegistry:
    reg = getattr(model, _ATTR, None)
    if reg is None:
        if not create:
            raise ValueError("this model has no dist_lora adapters; call dist_lora.apply_lora first")
        reg = AdapterRegistry()
        setattr(model, _ATTR, reg)
    return reg


def existing(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapter configs by name (empty if it has none yet); read-only use."""
    reg = getattr(model, _ATTR, None)
    return {} if reg is None else reg.configs


def snapshot(model: nn.Module) -> AdapterRegistry | None:
    """A copy of the registry's state (``None``: the model has no registry)."""
    reg = getattr(model, _ATTR, None)
    return None if reg is None else AdapterRegistry(dict(reg.configs), list(reg.active), reg.disabled)


def restore(model: nn.Module, saved: AdapterRegistry | None) -> None:
    """Put back a :func:`snapshot` (removing the registry if there was none)."""
    if saved is None:
        if hasattr(model, _ATTR):
            delattr(model, _ATTR)
        return
    reg = registry(model, create=True)
    reg.configs, reg.active, reg.disabled = dict(saved.configs), list(saved.active), saved.disabled


def drop(model: nn.Module) -> None:
    """Forget every adapter (after unloading them all)."""
    delattr(model, _ATTR)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    yield from adapter_layers(model)
    yield from saved_modules(model)


def require_adapter(model: nn.Module, name: str) -> LoraConfig:
    reg = registry(model)
    if name not in reg.configs:
        raise ValueError(f"adapter {name!r} does not exist; adapters: {sorted(reg.configs)}")
    return reg.configs[name]
