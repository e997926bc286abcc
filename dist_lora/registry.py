"""Where a model keeps its adapters: configs, active set, and the wrapper modules holding them.

Adapters are found through their wrapper *types* (``AdapterLayer``, ``ModulesToSave``), never by
matching parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from dist_lora.config import LoraConfig
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
