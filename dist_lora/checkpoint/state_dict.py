"""Whole adapters in PEFT's key naming, in memory: gather from shards, or shard onto a layout.

Keys are those of ``peft.get_peft_model_state_dict``:
``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_B.bias`` (lora_bias)
/ ``.lora_magnitude_vector`` (DoRA), ``.lora_embedding_A`` / ``.lora_embedding_B`` (embeddings),
``base_model.model.<HF module>.weight`` (modules_to_save) and trainable base biases
(``bias="all"`` / ``"lora_only"``). A fused Megatron adapter appears as one adapter per projection
sharing the same A; vocabulary padding is cut off.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, require_adapter, saved_modules, wrappers
from dist_lora.checkpoint.peft_names import PREFIX, bias_key, join_fused, peft_key, split_fused
from dist_lora.integrations.deepspeed import gathered, is_partitioned
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.sharding import FactorLayout
from dist_lora.parallel.collectives import all_gather_object, all_gather_tensors, on_every_rank


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every tensor an adapter state dict reads or writes: factors, modules_to_save copies and
    base biases, never a base weight (so ZeRO-3 gathers only these for export / loading)."""
    return [p for _, wrapper in wrappers(model) for name, p in wrapper.named_parameters()
            if not (name.startswith("base_layer.") and not name.endswith(".bias"))]


def _kind(layer: AdapterLayer, factors: LoraFactors | None = None) -> str:
    if factors is not None and factors.key_kind is not None:
        return factors.key_kind
    return "embedding" if layer.shard.kind == "embedding" else "linear"


def _gather(tensor: torch.Tensor, layout: FactorLayout, group) -> torch.Tensor:
    sharded = layout.dim is not None and group is not None  # group None: a plain (TP = 1) layer
    return layout.gather(all_gather_tensors(tensor, group) if sharded else [tensor.detach()])


def _factor_entries(layer: AdapterLayer, factors: LoraFactors, spec, gradients: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, layout in factors.layouts().items():
        param = getattr(factors, name)
        value = param.grad if gradients else param
        value = factors.held(name, torch.zeros_like(param) if value is None else value)
        full = _gather(value, layout, layer.shard.tp_group)
        slot = factors.slot
        for hf, tensor in split_fused(slot.fused, full, slot.hf_names, spec, shared=name == "lora_A").items():
            out[peft_key(hf, _kind(layer, factors), name)] = tensor.clone()
    return out


def _bias_entries(model: nn.Module, adapter: str, gradients: bool) -> dict[str, torch.Tensor]:
    """Trainable base biases (``bias="all"`` / ``"lora_only"``), as PEFT names them."""
    mode = require_adapter(model, adapter).bias
    if mode == "none":
        return {}
    out, spec = {}, view(model).spec
    for name, layer in adapter_layers(model):
        bias = getattr(layer.base_layer, "bias", None)
        if bias is None:
            continue
        slots = layer.factors_of(adapter)
        if mode == "lora_only" and not slots:
            continue
        layout = FactorLayout(dim=0) if layer.shard.kind == "column" else FactorLayout()
        value = bias.grad if gradients else bias
        full = _gather(torch.zeros_like(bias) if value is None else value, layout, layer.shard.tp_group)
        fused, hf_names = layer.fused_layout, layer.hf_names
        adapted = {n for s in slots.values() for n in s.slot.hf_names}
        for hf, tensor in split_fused(fused, full, hf_names, spec, shared=False).items():
            if mode == "lora_only" and hf not in adapted:
                continue
            out[bias_key(hf, hf in adapted)] = tensor.clone()
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", gradients: bool = False) -> dict:
    """The whole adapter ``adapter_name`` (or its gradients) in PEFT key naming, on every rank.

    Collective over the whole job: TP shards are all-gathered, PP stages exchange their parts.
    Memory: the full adapter on every rank (adapters are small; the base is never gathered).
    """
    require_adapter(model, adapter_name)
    params = adapter_parameters(model)
    if gradients and any(is_partitioned(p) for p in params):
        raise ValueError("under ZeRO-3 gradients live in DeepSpeed's partitioned buffers, not in .grad; "
                         "read them with deepspeed.utils.safe_get_full_grad")
    with gathered(params):
        return _adapter_state_dict(model, adapter_name, gradients)


def _adapter_state_dict(model: nn.Module, adapter_name: str, gradients: bool) -> dict:
    spec = view(model).spec
    out: dict[str, torch.Tensor] = {}
    for _, layer in adapter_layers(model):
        for factors in layer.factors_of(adapter_name).values():
            if not factors.vacant:  # vacant: a hotswapped adapter that does not target this slot
                out.update(_factor_entries(layer, factors, spec, gradients))
    for _, module in saved_modules(model):
        if adapter_name in module.copies:
            param = module.copies[adapter_name]
            value = param.grad if gradients else param
            full = _gather(torch.zeros_like(param) if value is None else value, module.layout, module.shard.tp_group)
            hf = module.hf_name
            out[f"{PREFIX}{hf}.weight"] = full.clone()
    out.update(_bias_entries(model, adapter_name, gradients))
    return dict(sorted(view(model).gather_stages(out).items()))


def _load_biases(model: nn.Module, state: dict, spec) -> set[str]:
    """Copy base biases present in ``state`` (``bias="all"`` / ``"lora_only"``) into their shards."""
    used = set()
    for _, layer in adapter_layers(model):
        bias = getattr(layer.base_layer, "bias", None)
        if bias is None:
            continue
        fused, hf_names = layer.fused_layout, layer.hf_names
        keys = {}
        for hf in hf_names:
            for key in (bias_key(hf, True), bias_key(hf, False)):
                if key in state:
                    keys[hf] = key
        if not keys:
            continue
        parts = {hf: state[keys[hf]] if hf in keys else None for hf in hf_names}
        local_full = _gather(bias, FactorLayout(dim=0) if layer.shard.kind == "column" else FactorLayout(),
                             layer.shard.tp_group)
        current = split_fused(fused, local_full, hf_names, spec, shared=False)
        parts = {hf: (p if p is not None else current[hf]) for hf, p in parts.items()}
        full = join_fused(fused, parts, hf_names, spec, shared=False)
        layout = FactorLayout(dim=0) if layer.shard.kind == "column" else FactorLayout()
        bias.data.copy_(layout.local(full.to(bias.dtype), layer.shard.tp, layer.shard.rank))
        used.update(keys.values())
    return used


def set_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Shard a whole adapter in PEFT key naming onto this model's layout (any TP / PP / DP).

    The adapter must exist (``apply_lora`` with a matching config); every key must be used by
    some rank and every tensor of the adapter must be given, else every rank raises. Base
    embedding / lm_head weights that PEFT saves with embedding adapters (``*.base_layer.weight``)
    are not adapter tensors and are ignored.
    """
    require_adapter(model, adapter_name)
    spec, used = view(model).spec, set()
    with on_every_rank(f"loading adapter {adapter_name!r}"):
        with torch.no_grad(), gathered(adapter_parameters(model), modify=True):
            for _, layer in adapter_layers(model):
                for factors in layer.factors_of(adapter_name).values():
                    if factors.vacant:
                        continue
                    slot, tensors = factors.slot, {}
                    for name in factors.layouts():
                        keys = [peft_key(hf, _kind(layer, factors), name) for hf in slot.hf_names]
                        missing = [k for k in keys if k not in state]
                        if missing:
                            raise KeyError(f"the state dict lacks {missing[0]}")
                        used.update(keys)
                        parts = {hf: state[k] for hf, k in zip(slot.hf_names, keys)}
                        tensors[name] = join_fused(slot.fused, parts, slot.hf_names, spec, shared=name == "lora_A")
                    factors.load_global({k: v.to(getattr(factors, k).dtype) for k, v in tensors.items()}, layer.shard)
            for _, module in saved_modules(model):
                if adapter_name in module.copies:
                    key = f"{PREFIX}{module.hf_name}.weight"
                    if key not in state:
                        raise KeyError(f"the state dict lacks {key}")
                    used.add(key)
                    module.copies[adapter_name].copy_(module.layout.local(state[key], module.shard.tp, module.shard.rank))
            used.update(_load_biases(model, state, spec))
    everyone = set().union(*all_gather_object(used))
    # PEFT stores the base embedding / lm_head weights next to adapters that target them
    # (``save_embedding_layers``); they are base weights, not part of the adapter.
    unused = sorted(k for k in state if k not in everyone and not k.endswith(".base_layer.weight"))
    if unused:
        raise ValueError(f"the state dict has keys this model's adapter {adapter_name!r} does not use: {unused[:5]}")
