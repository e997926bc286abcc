"""Adapter methods by PEFT's ``peft_type``: one table for the config class, the function that
adds an adapter of that method, and the module holding its training state beyond parameters and
optimizer (if any).

Entries import lazily: the method packages import ``dist_lora.config`` themselves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from dist_lora.config import LoraConfig


@dataclass(frozen=True)
class Method:
    config: str  # "module:Class"
    add: str  # "module:function(model, config, adapter_name)"
    # Module with ``NAMESPACE``, ``state_tensors(model, adapter) -> {param: {name: tensor}}`` (local
    # shards shaped like the parameter), ``check_resumable(config, saved_config)`` and the collective
    # ``restore_state(model, adapter, tensors)``; see dist_lora/adalora/state.py. None: no such state.
    training_state: str | None = None


_METHODS = {
    "LORA": Method("dist_lora.config:LoraConfig", "dist_lora.apply:add_adapter"),
    "ADALORA": Method("dist_lora.adalora.config:AdaLoraConfig", "dist_lora.adalora.apply:apply_adalora",
                      "dist_lora.adalora.state"),
}


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def method(peft_type: str) -> Method:
    if peft_type not in _METHODS:
        raise ValueError(f"peft_type={peft_type!r} is not supported by dist_lora; supported: {sorted(_METHODS)}")
    return _METHODS[peft_type]


def config_from_dict(data: dict[str, Any]) -> LoraConfig:
    """The config of the method ``data["peft_type"]`` names (default LORA), from PEFT's keys."""
    return _load(method(data.get("peft_type", "LORA")).config).from_dict(data)


def adder(config: LoraConfig) -> Callable:
    """``add(model, config, adapter_name)`` for ``config``'s method."""
    return _load(method(config.peft_type).add)


def training_state_module(config: LoraConfig) -> ModuleType | None:
    """The module with ``config``'s method-specific training state, or None (LoRA: none)."""
    name = method(config.peft_type).training_state
    return None if name is None else importlib.import_module(name)
