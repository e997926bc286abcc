"""Whole adapters in PEFT's key naming, in memory: gather from shards, or shard onto a layout.

Keys are those of ``peft.get_peft_model_state_dict``:
``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_B.bias`` (lora_bias)
/ ``.lora_magnitude_vector`` (DoRA), ``.lora_embedding_A`` / ``.lora_embedding_B`` (embeddings),
``base_model.model.<HF module>.weight`` (modules_to_save), ``.base_layer.bias`` (the adapted
rows ``bias="lora_only"`` trains) and every base bias ``bias="all"`` trains (``<module>.bias``, or
``.base_layer.bias`` on adapted modules). A fused Megatron adapter appears as one adapter per projection
sharing the same A; vocabulary padding is cut off. Adapters on routed
experts appear as PEFT's ``target_parameters`` adapters, every expert's factors of a layer packed
into one ``lora_A`` / ``lora_B`` (:mod:`dist_lora.checkpoint.expert_keys`), gathered over ETP and EP.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adapters.biases import all_trained_biases, trained_biases
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, registry, require_adapter, saved_modules, wrappers
from dist_lora.checkpoint.expert_keys import pack, peft_expert_key, unpack
from dist_lora.checkpoint.peft_names import PREFIX, bias_key, join_fused, peft_key, split_fused
from dist_lora.integrations.deepspeed import gathered, is_partitioned
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.expert_linear import ExpertLoraLinear
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.sharding import FactorLayout
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import all_gather_object, all_gather_tensors


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every tensor an adapter state dict reads or writes: factors, modules_to_save copies and
    base biases, never a base weight (so ZeRO-3 gathers only these for export / loading)."""
    params = {id(p): p for _, wrapper in wrappers(model) for name, p in wrapper.named_parameters()
              if not (name.startswith("base_layer.") and not name.endswith(".bias"))}
    params.update({id(p): p for p in all_trained_biases(model, list(registry(model).configs))})
    return list(params.values())


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
    """The base biases ``bias="all"`` trains, every one of them, as PEFT names them."""
    out, spec = {}, view(model).spec
    for b in trained_biases(model, adapter):
        value = b.param.grad if gradients else b.param
        full = _gather(torch.zeros_like(b.param) if value is None else value, b.layout, b.tp_group)
        for hf, tensor in split_fused(b.fused, full, b.hf_names, spec, shared=False).items():
            out[bias_key(hf, hf in b.adapted)] = tensor.clone()
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


def _expert_entries(model: nn.Module, parts: dict, targets: list[str]) -> dict[str, torch.Tensor]:
    """Collective over the expert-parallel group: PEFT's packed tensors of this stage's routed
    experts from every rank's ``{(parameter, role): {expert: global factor}}``."""
    seam = view(model)
    merged: dict = {}
    for other in all_gather_object(parts, seam.ep_group) if seam.ep_group is not None else [parts]:
        for key, experts in other.items():
            merged.setdefault(key, {}).update(experts)
    out = {}
    for (param, role), experts in merged.items():
        count = seam.spec.experts.num_experts
        if sorted(experts) != list(range(count)):
            raise RuntimeError(f"{param}: the adapter covers experts {sorted(experts)}, not all {count}")
        out[peft_expert_key(param, role, targets, seam.spec)] = pack(role, [experts[e] for e in range(count)])
    return out


def _adapter_state_dict(model: nn.Module, adapter_name: str, gradients: bool) -> dict:
    spec = view(model).spec
    out: dict[str, torch.Tensor] = {}
    experts: dict = {}
    for _, layer in adapter_layers(model):
        for factors in layer.factors_of(adapter_name).values():
            if factors.vacant:  # a hotswapped adapter that does not target this slot
                continue
            if isinstance(layer, ExpertLoraLinear):
                for role in ("lora_A", "lora_B"):
                    value = getattr(factors, role).grad if gradients else getattr(factors, role)
                    value = factors.held(role, torch.zeros_like(getattr(factors, role)) if value is None else value)
                    full = _gather(value, factors.layouts()[role], layer.shard.tp_group).clone()
                    experts.setdefault((factors.slot.hf_names[0], role), {})[layer.expert] = full
                continue
            out.update(_factor_entries(layer, factors, spec, gradients))
    if spec is not None and spec.experts is not None:
        out.update(_expert_entries(model, experts, require_adapter(model, adapter_name).target_parameters or []))
    for _, module in saved_modules(model):
        if adapter_name in module.copies:
            param = module.copies[adapter_name]
            value = param.grad if gradients else param
            full = _gather(torch.zeros_like(param) if value is None else value, module.layout, module.shard.tp_group)
            hf = module.hf_name
            out[f"{PREFIX}{hf}.weight"] = full.clone()
    out.update(_bias_entries(model, adapter_name, gradients))
    return dict(sorted(view(model).gather_stages(out).items()))


def _load_biases(model: nn.Module, adapter: str, state: dict, spec) -> set[str]:
    """Copy the base biases ``bias="all"`` trains from ``state`` into their shards; a bias the
    state lacks keeps its value (PEFT saves every bias, but a fused bias may come in parts)."""
    used = set()
    for b in trained_biases(model, adapter):
        keys = {}
        for hf in b.hf_names:
            for key in (bias_key(hf, True), bias_key(hf, False)):
                if key in state:
                    keys[hf] = key
        if not keys:
            continue
        current = split_fused(b.fused, _gather(b.param, b.layout, b.tp_group), b.hf_names, spec, shared=False)
        parts = {hf: state[keys[hf]] if hf in keys else current[hf] for hf in b.hf_names}
        full = join_fused(b.fused, parts, b.hf_names, spec, shared=False)
        b.param.data.copy_(b.layout.local(full.to(b.param.dtype), b.tp, b.rank))
        used.update(keys.values())
    return used


def _load_expert(layer: ExpertLoraLinear, factors: LoraFactors, state: dict, targets: list[str], spec) -> list[str]:
    """This expert's factors from PEFT's packed tensors in ``state``; the keys used."""
    keys, tensors = [], {}
    for role in ("lora_A", "lora_B"):
        key = peft_expert_key(factors.slot.hf_names[0], role, targets, spec)
        if key not in state:
            raise KeyError(f"the state dict lacks {key}")
        tensors[role] = unpack(role, state[key], spec.experts.num_experts, factors.r, key)[layer.expert]
        keys.append(key)
    factors.load_global({k: v.to(getattr(factors, k).dtype) for k, v in tensors.items()}, layer.shard)
    return keys


def set_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Shard a whole adapter in PEFT key naming onto this model's layout (any TP / PP / DP).

    The adapter must exist (``apply_lora`` with a matching config); every key must be used by
    some rank and every tensor of the adapter must be given, else every rank raises. Base
    embedding / lm_head weights that PEFT saves with embedding adapters (``*.base_layer.weight``)
    are not adapter tensors and are ignored.
    """
    config = require_adapter(model, adapter_name)
    spec, used = view(model).spec, set()
    with on_every_rank(f"loading adapter {adapter_name!r}"):
        with torch.no_grad(), gathered(adapter_parameters(model), modify=True):
            for _, layer in adapter_layers(model):
                for factors in layer.factors_of(adapter_name).values():
                    if factors.vacant:
                        continue
                    if isinstance(layer, ExpertLoraLinear):
                        used.update(_load_expert(layer, factors, state, config.target_parameters or [], spec))
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
            used.update(_load_biases(model, adapter_name, state, spec))
    everyone = set().union(*all_gather_object(used))
    # PEFT stores the base embedding / lm_head weights next to adapters that target them
    # (``save_embedding_layers``); they are base weights, not part of the adapter.
    unused = sorted(k for k in state if k not in everyone and not k.endswith(".base_layer.weight"))
    if unused:
        raise ValueError(f"the state dict has keys this model's adapter {adapter_name!r} does not use: {unused[:5]}")
