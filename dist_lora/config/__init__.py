"""Adapter configurations: PEFT's ``adapter_config.json`` fields as JSON-round-tripping dataclasses.

Pure Python (no torch, no process group): configs can be read, validated and written anywhere.
"""

from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.config.eva import EvaConfig
from dist_lora.config.lora import LoftQConfig, LoraConfig

__all__ = ["AdaLoraConfig", "EvaConfig", "LoftQConfig", "LoraConfig"]
