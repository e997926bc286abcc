"""``initialize_lora_eva_weights``: put EVA's components into ``lora_A`` and record the new ranks.

As PEFT's ``_load_eva_state_dict``: a layer whose EVA rank differs from its configured ``r`` is
rebuilt with the new rank (``lora_alpha`` scaled by ``new_r / r`` when
``adjust_scaling_factors``); ``lora_A`` = the components, ``lora_B`` = 0 (DoRA's magnitude is
the base row norm again). A layer whose rank dropped to 0 loses its adapter and leaves
``target_modules``. The adapter's config gets PEFT's ``rank_pattern`` / ``alpha_pattern``
(entries only where the value differs from ``r`` / ``lora_alpha``) and the adapted modules as
``target_modules`` (condensed to suffixes from 20 modules on, as PEFT does), merged over
pipeline stages.
"""

from __future__ import annotations

import torch

from dist_lora.adapters.model import view
from dist_lora.adapters.registry import registry, require_adapter
from dist_lora.adapters.targets import pattern_value
from dist_lora.adapters.trainable import refresh
from dist_lora.eva.collect import eva_slots, get_eva_state_dict
from dist_lora.layers.dora import norm_now
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import all_gather_object

MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # PEFT condenses longer target lists to suffixes


def minimal_target_modules(targets: set[str], others: set[str]) -> set[str]:
    """PEFT's condensed ``target_modules``: for each target (in the order of its suffix list,
    shortest suffix first), the shortest dotted suffix that no other module name ends with,
    unless a suffix already chosen covers it."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {suffix for name in others for suffix in suffixes(name)}
    chosen: set[str] = set()
    for name, options in sorted(((n, suffixes(n)) for n in targets), key=lambda item: item[1]):
        for suffix in options:
            if suffix in chosen or suffix in taken:
                continue
            if not any(name.endswith("." + c) for c in chosen):
                chosen.add(suffix)
                break
    return chosen or set(targets)


def _local_rows(tensor: torch.Tensor, layer, factors: LoraFactors) -> torch.Tensor:
    """``tensor`` [new_r, in] (global, e.g. from PEFT) or [new_r, in/p] (this rank's shard)."""
    shard = layer.shard
    local_in = factors.lora_A.shape[1]
    if tensor.dim() != 2 or tensor.shape[1] not in (local_in, shard.in_features):
        raise ValueError(f"EVA tensor of shape {tuple(tensor.shape)} does not fit lora_A [r, {shard.in_features}] "
                         f"(or its shard [r, {local_in}])")
    if tensor.shape[1] == local_in:
        return tensor
    return factors.a_layout.local(tensor, shard.tp, shard.rank)


def _plan_updates(model, config, state: dict, adapter_name: str) -> list:
    """Validated (name, layer, key, new_r, new_alpha, local A) per local slot; no writes."""
    updates = []
    for name, layer, key in eva_slots(model, adapter_name):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        if name not in state:
            updates.append((name, layer, key, r, alpha, None))
            continue
        factors = layer.factors_of(adapter_name)[key]
        w = _local_rows(state[name], layer, factors)
        new_r = w.shape[0]
        if new_r and new_r != r and config.eva_config.adjust_scaling_factors:
            alpha = alpha * new_r / r
        updates.append((name, layer, key, new_r, alpha, w))
    return updates


def _apply(model, config, updates, adapter_name: str) -> tuple[list, dict, dict]:
    kept, ranks, alphas = [], {}, {}
    for name, layer, key, new_r, alpha, w in updates:
        if new_r == 0:
            del layer.lora[adapter_name][key]
            if not len(layer.lora[adapter_name]):
                layer.delete_adapter(adapter_name)
            continue
        kept.append(name)
        if new_r != config.r:
            ranks[name] = new_r
        if alpha != config.lora_alpha:
            alphas[name] = alpha
        if w is None:
            continue
        old = layer.factors_of(adapter_name)[key]
        factors = LoraFactors(layer.shard, old.slot, new_r, alpha, config.scaling_for(new_r, alpha),
                              config.lora_dropout, config.lora_bias, config.use_dora, old.lora_A.dtype,
                              old.lora_A.device)
        if old.trained_bias is not None:
            factors.own_bias(old.trained_bias)
        with torch.no_grad():
            factors.lora_A.copy_(w)
            if config.use_dora:
                factors.lora_magnitude_vector.copy_(norm_now(layer, factors))
        layer.lora[adapter_name][key] = factors
    return kept, ranks, alphas


@torch.no_grad()
def initialize_lora_eva_weights(model, dataloader=None, eva_state_dict: dict | None = None,
                                adapter_name: str = "default", **kwargs):
    """Initialise the adapter ``adapter_name`` (``init_lora_weights="eva"``) with EVA, in place.

    Either ``dataloader`` (then :func:`~dist_lora.eva.collect.get_eva_state_dict` runs with
    ``kwargs``) or ``eva_state_dict`` (HF module name -> [new_r, in] global or this rank's
    shard, e.g. PEFT's) is needed. Every check runs, on every rank, before the model changes.
    """
    config = None
    with on_every_rank("EVA initialisation"):
        config = require_adapter(model, adapter_name)
        if config.init_lora_weights != "eva":
            raise ValueError(f"adapter {adapter_name!r} has init_lora_weights={config.init_lora_weights!r}; "
                             f"initialize_lora_eva_weights needs init_lora_weights='eva'")
        if len(registry(model).active) > 1:
            raise ValueError("initialize_lora_eva_weights works with a single active adapter (as PEFT); "
                             "set_adapter to one first")
        if eva_state_dict is None and dataloader is None:
            raise ValueError("give a dataloader or an eva_state_dict")
    if eva_state_dict is None:
        eva_state_dict = get_eva_state_dict(model, dataloader, adapter_name=adapter_name, **kwargs)
    updates = None
    with on_every_rank("EVA initialisation"):
        updates = _plan_updates(model, config, {k.removeprefix("base_model.model."): v
                                                for k, v in eva_state_dict.items()}, adapter_name)
    kept, ranks, alphas = _apply(model, config, updates, adapter_name)
    names = {c.hf_name for c in view(model).candidates() if c.slot.fused is None}
    others = set()
    for part in all_gather_object((kept, ranks, alphas, names)):
        kept += [n for n in part[0] if n not in kept]
        ranks.update(part[1])
        alphas.update(part[2])
        others |= part[3]
    others -= set(kept)
    if len(kept) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        kept = minimal_target_modules(set(kept), others)
    new = config.copy()
    new.target_modules, new.rank_pattern, new.alpha_pattern = sorted(set(kept)), ranks, alphas
    registry(model).configs[adapter_name] = new
    refresh(model)
    return model
