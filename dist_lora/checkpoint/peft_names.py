"""PEFT's key names for adapter tensors, and the split / join of fused Megatron adapters.

One table maps a tensor's role to its PEFT key suffix; a fused adapter (one adapter over
q/k/v or gate/up) is split into per-projection tensors sharing one ``lora_A``. Also: PEFT tensors
grouped by module (``adapter_modules``) and each HF module's Megatron counterpart
(``hf_module_table``).
"""

from __future__ import annotations

import torch

from dist_lora.adapters.targets import pattern_value
from dist_lora.config.lora import LoraConfig
from dist_lora.models.layouts import read_local, unshard

PREFIX = "base_model.model."
SUFFIXES = {
    ("linear", "lora_A"): "lora_A.weight",
    ("linear", "lora_B"): "lora_B.weight",
    ("linear", "lora_bias"): "lora_B.bias",
    ("linear", "lora_magnitude_vector"): "lora_magnitude_vector",
    ("linear", "trained_bias"): "base_layer.bias",  # bias="lora_only": the adapted module's own bias
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

    class _Reader:
        def shape(self, name):
            return tuple(parts[name].shape)

        def read(self, name, rows=None, cols=None):
            return parts[name][slice(*rows)] if rows else parts[name]

    return read_local(fused, _Reader(), list(names), spec, 1, 0)


def bias_key(hf_name: str, adapted: bool) -> str:
    """Key of a trainable base bias (``bias="all"`` / ``"lora_only"``), as PEFT names it."""
    return f"{PREFIX}{hf_name}.base_layer.bias" if adapted else f"{PREFIX}{hf_name}.bias"


def adapter_modules(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """HF module name -> its adapter tensors (by role) and scaling."""
    roles = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "lora_bias",
             "lora_magnitude_vector": "m", "lora_embedding_A": "emb_A", "lora_embedding_B": "emb_B"}
    out: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, role in roles.items():
            if name.endswith("." + suffix):
                out.setdefault(name[: -len(suffix) - 1], {})[role] = tensor
                break
    for module, parts in out.items():
        r = (parts.get("A") if "A" in parts else parts["emb_A"]).shape[0]
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        parts["scaling"] = config.scaling_for(r, alpha)
    return out


def hf_module_table(spec) -> dict[str, tuple[str, str, bool]]:
    """HF module name -> (Megatron module name with global layer index, layout, in a fused layer);
    routed experts are not modules PEFT adapts (see :mod:`dist_lora.checkpoint.expert_keys`)."""
    table = {"lm_head": ("output_layer", "vocab", False)}
    for entry in spec.family.weights:
        if (not entry.megatron.endswith(".weight") or entry.layout == "replicated" or entry.when == "tied"
                or entry.per_expert):
            continue
        for layer in range(spec.num_layers) if entry.per_layer else [None]:
            megatron = entry.megatron[: -len(".weight")].format(layer=layer)
            for hf in entry.hf:
                table[hf[: -len(".weight")].format(layer=layer)] = (megatron, entry.layout,
                                                                    entry.layout in ("qkv", "glu"))
    return table


def module_kinds(spec) -> dict[str, str]:
    """HF module name -> ``linear`` | ``output`` | ``embedding``, for every module of ``spec``
    that could carry an adapter (what PEFT's ``target_modules`` is matched against)."""
    return {hf: "output" if hf == "lm_head" else "embedding" if layout == "vocab" else "linear"
            for hf, (_, layout, _) in hf_module_table(spec).items()}
