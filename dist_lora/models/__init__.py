"""Megatron-Core GPT models from Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text).

Attributes are imported on first use (PEP 562), so offline tools that only need the config
tables (``dist_lora.models.spec``) do not pay for importing megatron-core.
"""

from __future__ import annotations

from dist_lora import lazy_exports

_EXPORTS = {
    "ModelInfo": "dist_lora.models.loading",
    "from_pretrained": "dist_lora.models.loading",
    "model_info": "dist_lora.models.loading",
    "logits": "dist_lora.models.forward",
    "save_pretrained": "dist_lora.models.saving",
    "ModelSpec": "dist_lora.models.spec",
    "read_spec": "dist_lora.models.spec",
    "spec_from_config": "dist_lora.models.spec",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
