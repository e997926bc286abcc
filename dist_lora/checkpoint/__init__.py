"""Adapter checkpoints: sharded with resharding, and Hugging Face PEFT's format both ways."""

from dist_lora.checkpoint.peft_format import export_peft, import_peft, read_peft
from dist_lora.checkpoint.sharded import load_adapter, read_manifest, save_adapter
from dist_lora.checkpoint.training_state import load_training_state, save_training_state

__all__ = ["export_peft", "import_peft", "load_adapter", "load_training_state", "read_manifest", "read_peft",
           "save_adapter", "save_training_state"]
