"""dist_lora: LoRA-family adapters for sharded (Megatron-Core / DeepSpeed) training.

The top level is the adapter API, named as in PEFT; models, parallel groups and collectives live
in ``dist_lora.models`` and ``dist_lora.parallel``. Names load on first use (PEP 562), so tools
that need only configs or checkpoints' metadata (``dist_lora.config``, ``dist-lora inspect``) do
not import torch or megatron-core. See ``docs/ARCHITECTURE.md`` for the layout.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AdaLoraConfig": "dist_lora.config.adalora",
    "EvaConfig": "dist_lora.config.eva",
    "LoftQConfig": "dist_lora.config.lora",
    "LoraConfig": "dist_lora.config.lora",
    "add_adapter": "dist_lora.adapters.lora",
    "apply_lora": "dist_lora.adapters.lora",
    "active_adapters": "dist_lora.adapters.management",
    "delete_adapter": "dist_lora.adapters.management",
    "disable_adapter": "dist_lora.adapters.management",
    "disable_adapters": "dist_lora.adapters.management",
    "enable_adapters": "dist_lora.adapters.management",
    "merge_adapter": "dist_lora.adapters.management",
    "merge_and_unload": "dist_lora.adapters.management",
    "set_adapter": "dist_lora.adapters.management",
    "unload": "dist_lora.adapters.management",
    "unmerge_adapter": "dist_lora.adapters.management",
    "check_replicas": "dist_lora.adapters.replicas",
    "enable_hotswap": "dist_lora.adapters.hotswap",
    "quantize_base": "dist_lora.adapters.quantize",
    "adapter_state_dict": "dist_lora.checkpoint.state_dict",
    "set_adapter_state_dict": "dist_lora.checkpoint.state_dict",
    "export_peft": "dist_lora.checkpoint.peft_format",
    "import_peft": "dist_lora.checkpoint.peft_format",
    "load_adapter": "dist_lora.checkpoint.sharded",
    "save_adapter": "dist_lora.checkpoint.sharded",
    "load_training_state": "dist_lora.checkpoint.training_state",
    "save_training_state": "dist_lora.checkpoint.training_state",
    "add_weighted_adapter": "dist_lora.combine.weighted",
    "apply_adalora": "dist_lora.adalora.apply",
    "export_adalora": "dist_lora.adalora.export",
    "orth_reg_loss": "dist_lora.adalora.orth",
    "shrink_to_rank_pattern": "dist_lora.adalora.shrink",
    "update_and_allocate": "dist_lora.adalora.allocator",
    "get_eva_state_dict": "dist_lora.eva.collect",
    "initialize_lora_eva_weights": "dist_lora.eva.initialize",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(namespace: dict, exports: dict[str, str]):
    """PEP 562 ``__getattr__`` / ``__dir__`` for a package whose names (``exports``: name ->
    module) load on first use; other names resolve to the package's submodules."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
