"""dist_lora: LoRA-family adapters for sharded (Megatron-Core / DeepSpeed) training."""

__version__ = "0.1.0"
