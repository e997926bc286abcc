"""Adapter methods by PEFT's ``peft_type``: the one table that turns a saved ``adapter_config.json``
into a config, an adapter on a model, and (for methods that have one) training state.

========  ===================  ====================================  =========================
type      config               adds the adapter                      training state
========  ===================  ====================================  =========================
LORA      ``LoraConfig``       :func:`dist_lora.adapters.lora.add_adapter`  -
ADALORA   ``AdaLoraConfig``    :func:`dist_lora.adalora.apply.apply_adalora`  :mod:`dist_lora.adalora.state`
========  ===================  ====================================  =========================

A training-state module has ``NAMESPACE``, ``state_tensors(model, adapter) -> {param: {name:
tensor}}`` (local shards shaped like the parameter), ``check_resumable(config, saved_config)`` and
the collective ``restore_state(model, adapter, tensors)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from dist_lora.adalora import state as adalora_state
from dist_lora.adalora.apply import apply_adalora
from dist_lora.adapters.lora import add_adapter
from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.config.lora import LoraConfig


@dataclass(frozen=True)
class Method:
    config: type[LoraConfig]
    add: Callable  # add(model, config, adapter_name)
    training_state: ModuleType | None = None


METHODS = {
    "LORA": Method(LoraConfig, add_adapter),
    "ADALORA": Method(AdaLoraConfig, apply_adalora, adalora_state),
}


def method(peft_type: str) -> Method:
    if peft_type not in METHODS:
        raise ValueError(f"peft_type={peft_type!r} is not supported by dist_lora; supported: {sorted(METHODS)}")
    return METHODS[peft_type]


def config_from_dict(data: dict[str, Any]) -> LoraConfig:
    """The config of the method ``data["peft_type"]`` names (default LORA), from PEFT's keys."""
    return method(data.get("peft_type", "LORA")).config.from_dict(data)


def add_from_config(model, config: LoraConfig, adapter_name: str):
    """Add an adapter of ``config``'s method (collective, like every way of adding one)."""
    return method(config.peft_type).add(model, config, adapter_name)


def training_state_module(config: LoraConfig) -> ModuleType | None:
    """The module with ``config``'s method-specific training state, or None (LoRA: none)."""
    return method(config.peft_type).training_state
