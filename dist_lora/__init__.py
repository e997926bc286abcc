"""dist_lora: LoRA-family adapters for sharded (Megatron-Core / DeepSpeed) training.

The top level re-exports the adapter API (named as in PEFT); models, parallel groups and
collectives live in ``dist_lora.models`` and ``dist_lora.parallel``.
"""

__version__ = "0.1.0"

from dist_lora.adalora import (
    AdaLoraConfig,
    apply_adalora,
    export_adalora,
    orth_reg_loss,
    shrink_to_rank_pattern,
    update_and_allocate,
)
from dist_lora.apply import add_adapter, apply_lora
from dist_lora.checkpoint import (
    export_peft,
    import_peft,
    load_adapter,
    load_training_state,
    save_adapter,
    save_training_state,
)
from dist_lora.combine import add_weighted_adapter
from dist_lora.config import LoftQConfig, LoraConfig
from dist_lora.eva.collect import get_eva_state_dict
from dist_lora.eva.config import EvaConfig
from dist_lora.eva.initialize import initialize_lora_eva_weights
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
from dist_lora.quantize import quantize_base
from dist_lora.replicas import check_replicas
from dist_lora.state import adapter_state_dict, set_adapter_state_dict

__all__ = [
    "AdaLoraConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "active_adapters",
    "adapter_state_dict",
    "add_adapter",
    "add_weighted_adapter",
    "apply_adalora",
    "apply_lora",
    "check_replicas",
    "delete_adapter",
    "disable_adapter",
    "disable_adapters",
    "enable_adapters",
    "export_adalora",
    "export_peft",
    "get_eva_state_dict",
    "import_peft",
    "initialize_lora_eva_weights",
    "load_adapter",
    "load_training_state",
    "merge_adapter",
    "merge_and_unload",
    "orth_reg_loss",
    "quantize_base",
    "save_adapter",
    "save_training_state",
    "set_adapter",
    "set_adapter_state_dict",
    "shrink_to_rank_pattern",
    "unload",
    "unmerge_adapter",
    "update_and_allocate",
]
