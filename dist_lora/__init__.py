"""dist_lora: LoRA-family adapters for sharded (Megatron-Core / DeepSpeed) training.

The top level re-exports the adapter API (named as in PEFT); models, parallel groups and
collectives live in ``dist_lora.models`` and ``dist_lora.parallel``.
"""

__version__ = "0.1.0"

from dist_lora.apply import add_adapter, apply_lora
from dist_lora.checkpoint import (
    export_peft,
    import_peft,
    load_adapter,
    load_training_state,
    save_adapter,
    save_training_state,
)
from dist_lora.config import LoftQConfig, LoraConfig
from dist_lora.management import (
    active_adapters,
    delete_adapter,
    disable_adapter,
    disable_adapters,
    enable_adapters,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge_adapter,
)
from dist_lora.replicas import check_replicas
from dist_lora.state import adapter_state_dict, set_adapter_state_dict

__all__ = [
    "LoftQConfig",
    "LoraConfig",
    "active_adapters",
    "adapter_state_dict",
    "add_adapter",
    "apply_lora",
    "check_replicas",
    "delete_adapter",
    "disable_adapter",
    "disable_adapters",
    "enable_adapters",
    "export_peft",
    "import_peft",
    "load_adapter",
    "load_training_state",
    "merge_adapter",
    "merge_and_unload",
    "save_adapter",
    "save_training_state",
    "set_adapter",
    "set_adapter_state_dict",
    "unload",
    "unmerge_adapter",
]
