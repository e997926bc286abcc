"""Finding AdaLoRA adapters in a model, and the process groups the allocator reduces over."""

from __future__ import annotations

from typing import Iterator

from torch import nn

from dist_lora.adalora.factors import SVDFactors
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, require_adapter
from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.layers.adapter_layer import AdapterLayer


def adalora_config(model: nn.Module, adapter_name: str) -> AdaLoraConfig:
    config = require_adapter(model, adapter_name)
    if not isinstance(config, AdaLoraConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not AdaLoRA "
                         f"(add it with dist_lora.apply_adalora)")
    return config


def svd_factors(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, AdapterLayer, SVDFactors]]:
    """(HF module name, wrapper, factors) of every local AdaLoRA slot, in a fixed order."""
    for _, layer in adapter_layers(model):
        for factors in layer.factors_of(adapter_name).values():
            if isinstance(factors, SVDFactors):
                yield factors.slot.hf_names[0], layer, factors


def pp_group(model: nn.Module):
    """The pipeline group when PP > 1, else ``None`` (nothing to exchange)."""
    return view(model).pp_group


def dp_group(model: nn.Module):
    """The data-parallel group when DP > 1, else ``None``."""
    return view(model).dp_group
