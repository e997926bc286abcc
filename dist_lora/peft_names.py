"""PEFT's key names for adapter tensors, and the split / join of fused Megatron adapters.

One table maps a tensor's role to its PEFT key suffix; a fused adapter (one adapter over
q/k/v or gate/up) is split into per-projection tensors sharing one ``lora_A``.
"""

from __future__ import annotations

import torch

PREFIX = "base_model.model."
SUFFIXES = {
    ("linear", "lora_A"): "lora_A.weight",
    ("linear", "lora_B"): "lora_B.weight",
    ("linear", "lora_bias"): "lora_B.bias",
    ("linear", "lora_magnitude_vector"): "lora_magnitude_vector",
    ("embedding", "lora_A"): "lora_embedding_A",
    ("embedding", "lora_B"): "lora_embedding_B",
    ("svd", "lora_A"): "lora_A",  # AdaLoRA keeps its factors in ParameterDicts: no ".weight"
    ("svd", "lora_B"): "lora_B",
    ("svd", "lora_E"): "lora_E",
}


def peft_key(hf_name: str, kind: str, role: str) -> str:
    return f"{PREFIX}{hf_name}.{SUFFIXES[(kind, role)]}"


def split_fused(fused: str | None, tensor: torch.Tensor, names: tuple[str, ...], spec, shared: bool) -> dict:
    """Per-HF-module tensors of a (possibly fused) global tensor; ``shared``: the same for all."""
    if fused is None:
        return {names[0]: tensor}
    if shared:
        return {n: tensor for n in names}
    from dist_lora.models.layouts import unshard

    return dict(zip(names, unshard(fused, [tensor], spec)))


def join_fused(fused: str | None, parts: dict, names: tuple[str, ...], spec, shared: bool) -> torch.Tensor:
    """Inverse of ``split_fused``; a shared tensor must be equal in every part."""
    if fused is None:
        return parts[names[0]]
    if shared:
        first = parts[names[0]]
        if any(not torch.equal(parts[n], first) for n in names[1:]):
            raise ValueError(f"{', '.join(names)} have different lora_A; a fused adapter needs one A shared by "
                             f"its projections (import them as per-projection adapters instead)")
        return first
    from dist_lora.models.layouts import read_local

    class _Reader:
        def shape(self, name):
            return tuple(parts[name].shape)

        def read(self, name, rows=None, cols=None):
            return parts[name][slice(*rows)] if rows else parts[name]

    return read_local(fused, _Reader(), list(names), spec, 1, 0)


def bias_key(hf_name: str, adapted: bool) -> str:
    """Key of a trainable base bias (``bias="all"`` / ``"lora_only"``), as PEFT names it."""
    return f"{PREFIX}{hf_name}.base_layer.bias" if adapted else f"{PREFIX}{hf_name}.bias"
