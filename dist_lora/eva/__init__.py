"""EVA (Explained Variance Adaptation) initialisation on sharded models: PEFT's API and results,
computed from tensor-, sequence- and data-parallel shards with compact sketches.

``dist_lora.config`` imports :mod:`dist_lora.eva.config`, so the rest loads lazily (no cycle).
"""

from dist_lora.eva.config import EvaConfig

__all__ = ["EvaConfig", "get_eva_state_dict", "initialize_lora_eva_weights"]


def __getattr__(name):
    if name == "get_eva_state_dict":
        from dist_lora.eva.collect import get_eva_state_dict

        return get_eva_state_dict
    if name == "initialize_lora_eva_weights":
        from dist_lora.eva.initialize import initialize_lora_eva_weights

        return initialize_lora_eva_weights
    raise AttributeError(name)
