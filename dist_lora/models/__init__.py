"""Megatron-Core GPT models from Hugging Face checkpoints (Llama, Mistral, Qwen2 layouts)."""

from dist_lora.models.forward import logits
from dist_lora.models.loading import ModelInfo, from_pretrained, model_info
from dist_lora.models.saving import save_pretrained
from dist_lora.models.spec import ModelSpec, read_spec, spec_from_config

__all__ = [
    "ModelInfo",
    "ModelSpec",
    "from_pretrained",
    "logits",
    "model_info",
    "read_spec",
    "save_pretrained",
    "spec_from_config",
]
