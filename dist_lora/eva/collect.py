"""``get_eva_state_dict``: EVA's components for every adapted layer, from sharded activations.

Mirrors PEFT's loop: batches are drawn round-robin from the dataloader (each data-parallel rank
its own) until every layer's components that its current rank needs have converged (cosine
similarity >= tau between steps); layers that converge stop receiving data, and start again if
a redistribution gives them more rank. After each batch the rank budget is redistributed by
explained variance (:mod:`dist_lora.eva.ranks`). The decisions are made on values every rank
agrees on: convergence flags are min-reduced over all ranks, and the explained-variance ratios
of every stage's layers are all-gathered, so no rank stops while another waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import cycle

import torch

from dist_lora.adapters.management import disable_adapter
from dist_lora.adapters.registry import adapter_layers, require_adapter
from dist_lora.adapters.targets import pattern_value
from dist_lora.config.eva import EvaConfig
from dist_lora.config.lora import LoraConfig
from dist_lora.eva.hooks import EvaHook, token_groups
from dist_lora.eva.ranks import layer_order, rank_distribution
from dist_lora.eva.svd import CommMeter, ShardedIncrementalPCA
from dist_lora.models.forward import logits
from dist_lora.models.loading import model_info
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import all_gather_object, all_reduce_
from dist_lora.parallel.device import collective_device

RHO_THRESHOLD = 1000  # as PEFT: very large rho is capped by the largest weight dimension


@dataclass
class EvaPlan:
    """The EVA layers of one adapter: local hooks, and the global layer order and budgets."""

    names: list[str]  # every EVA layer of the model (all pipeline stages), in model order
    leader: dict[str, str]  # layer -> the layer whose hook computes its (shared-input) SVD
    max_components: dict[str, int]
    budget: int
    hooks: dict[str, EvaHook] = field(default_factory=dict)  # local leaders only
    meter: CommMeter = field(default_factory=CommMeter)


def eva_slots(model, adapter_name: str):
    """(hf name, layer, slot key) of the adapter's EVA-capable slots on this rank, in model order.

    Embeddings are left to their default initialisation (as PEFT). A Megatron-fused adapter (one
    A over q/k/v) has no PEFT counterpart for EVA and is refused."""
    out = []
    for _, layer in adapter_layers(model):
        if layer.shard.kind == "embedding":
            continue
        factors = layer.factors_of(adapter_name)
        for key, f in factors.items():
            if f.slot.fused is not None:
                raise ValueError(f"EVA needs per-projection adapters; {layer.hf_names} carry one fused adapter "
                                 f"(target the Hugging Face names q_proj, k_proj, ... instead of linear_qkv)")
        keys = sorted(factors, key=lambda k: layer.hf_names.index(factors[k].slot.hf_names[0]))
        out += [(factors[k].slot.hf_names[0], layer, k) for k in keys]
    return out


def _plan(model, config, eva: EvaConfig, adapter_name: str, sketch_rank) -> EvaPlan:
    rho = eva.rho
    if rho > RHO_THRESHOLD:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    slots = eva_slots(model, adapter_name)
    local = []
    for name, layer, key in slots:
        lead = next(n for n, lay, _ in slots if lay is layer)
        local.append((name, lead, pattern_value(config.rank_pattern, name, config.r)))
    info = model_info(model).groups
    stages = all_gather_object((info.pp_rank, local))
    seen, ordered = set(), []
    for _, entries in sorted(stages, key=lambda e: e[0]):
        for entry in entries:
            if entry[0] not in seen:
                seen.add(entry[0])
                ordered.append(entry)
    if not ordered:
        raise ValueError(f"adapter {adapter_name!r} has no linear layer EVA can initialise")
    names = [n for n, _, _ in ordered]
    leader = {n: lead for n, lead, _ in ordered}
    max_components = {n: round(r * rho) for n, _, r in ordered}
    for lead in set(leader.values()):
        group = [n for n in names if leader[n] == lead]
        top = max(max_components[n] for n in group)
        max_components.update({n: top for n in group})
    plan = EvaPlan(names, leader, max_components, sum(r for _, _, r in ordered))
    for name, layer, _ in slots:
        if leader[name] == name:
            rows, features = token_groups(layer, info)
            pca = ShardedIncrementalPCA(max_components[name], eva.tau, rows, features, sketch_rank, plan.meter)
            plan.hooks[name] = EvaHook(layer, pca)
    return plan


def token_mask(batch, eva: EvaConfig) -> torch.Tensor:
    """[b, s] bool: tokens that count (attention mask, and labels != label_mask_value)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("EVA batches must be dicts with 'input_ids' [b, s] (and optionally 'attention_mask', "
                        f"'labels'), got {type(batch).__name__}")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("EVA needs right padding (attention_mask = 1...1 0...0 per row); left-padded batches "
                         "attend differently in Megatron's causal attention")
    if eva.use_label_mask and batch.get("labels") is not None:
        mask = mask & (batch["labels"] != eva.label_mask_value)
    return mask


def _check_dataloader(dataloader, groups) -> int:
    try:
        length = len(dataloader)
    except TypeError as err:
        raise TypeError("the EVA dataloader must have a length (a list or a torch DataLoader)") from err
    lengths = all_gather_object(length)
    if length == 0 or 0 in lengths:
        raise ValueError("the EVA dataloader is empty on some rank; give every data-parallel rank batches")
    if len(set(lengths)) > 1:
        raise ValueError(f"data-parallel ranks have different numbers of EVA batches ({lengths}); "
                         f"give every rank the same number, or EVA's collectives would wait forever")
    return length


def _forward(model, batch, mask, plan: EvaPlan, seq_multiple: int) -> None:
    pad = (-mask.shape[1]) % seq_multiple
    padded = torch.nn.functional.pad(mask, (0, pad), value=False)
    for hook in plan.hooks.values():
        hook.mask = padded
    logits(model, batch["input_ids"])


def _agree(plan: EvaPlan, rank_dist: dict[str, int]) -> dict[str, bool]:
    """Converged flag of every leader, the same on every rank (min over all ranks)."""
    leaders = [n for n in plan.names if plan.leader[n] == n]
    flags = torch.ones(len(leaders), device=collective_device())  # all-reduced over the world
    for i, name in enumerate(leaders):
        if name in plan.hooks:
            flags[i] = float(bool(plan.hooks[name].pca.converged[: rank_dist[name]].all()))
    all_reduce_(flags, None, "min")
    return {n: bool(f) for n, f in zip(leaders, flags.tolist())}


def _ratios(plan: EvaPlan):
    """Every leader's explained-variance ratios (all stages), or None if some has no SVD yet."""
    mine = {n: (h.pca.explained_variance_ratio if h.pca.fitted else None) for n, h in plan.hooks.items()}
    merged = {}
    for part in all_gather_object(mine):
        merged.update({k: v for k, v in part.items() if merged.get(k) is None})
    return None if any(v is None for v in merged.values()) else merged


def _run(model, dataloader, eva: EvaConfig, plan: EvaPlan, passes: int, limit: int) -> tuple[dict[str, int], int]:
    groups = model_info(model).groups
    seq_multiple = groups.tp_size if groups.sequence_parallel else 1
    hook_map = layer_order(plan.names, plan.leader)
    converged = {n: False for n in hook_map if hook_map[n] == n}
    rank_dist = dict(plan.max_components)
    for step, batch in enumerate(cycle(dataloader)):
        flags = _agree(plan, rank_dist)
        for name, flag in flags.items():
            if flag != converged[name]:
                converged[name] = flag
                if name in plan.hooks:
                    plan.hooks[name].active = not flag
        if all(converged.values()):
            break
        if step >= limit:
            raise RuntimeError(f"EVA did not converge within {limit} batches (tau={eva.tau}); lower tau or raise "
                               f"max_batches")
        mask = None
        with on_every_rank(f"EVA batch {step}"):
            mask = token_mask(batch, eva)
        _forward(model, batch, mask, plan, seq_multiple)
        ratios = _ratios(plan)
        if ratios is None:
            if step + 1 >= passes:
                raise ValueError(f"after {step + 1} EVA batches some layer never saw enough tokens for its "
                                 f"{max(plan.max_components.values())} components: the dataloader yields nothing but "
                                 f"padding / label-masked tokens, or batches too small (use_label_mask=False helps)")
            continue
        rank_dist = rank_distribution(ratios, hook_map, plan.budget, plan.max_components)
    return rank_dist, step


@torch.no_grad()
def get_eva_state_dict(model, dataloader, peft_config=None, adapter_name: str = "default",
                       sketch_rank: int | None = None, max_batches: int | None = None,
                       stats: dict | None = None) -> dict:
    """EVA components per adapted layer (HF module names -> ``lora_A`` rows), as PEFT computes.

    Each data-parallel rank iterates its own ``dataloader`` (dicts with ``input_ids``, optional
    ``attention_mask`` / ``labels``); all ranks must have the same number of batches. The
    returned tensors are this rank's shard of each layer's ``lora_A`` [new_r, in(/p)]: split on
    ``in`` for row-parallel layers, whole for column layers; layers of other pipeline stages are
    absent. ``peft_config`` defaults to the adapter's config (its ``eva_config`` or the default
    ``EvaConfig``). ``sketch_rank``: width q of the randomised subspace (default 2 x components, PEFT's q).
    ``max_batches`` (default 100 passes over the data) stops a run that never converges with an
    error instead of looping forever as PEFT does. ``stats`` (a dict) receives ``batches`` and
    ``bytes`` (what this rank sent in EVA's collectives).
    """
    config = peft_config if isinstance(peft_config, LoraConfig) else require_adapter(model, adapter_name)
    eva = config.eva_config or EvaConfig()
    groups = model_info(model).groups
    plan = length = None
    with on_every_rank("EVA"):
        length = _check_dataloader(dataloader, groups)
        plan = _plan(model, config, eva, adapter_name, sketch_rank)
    try:
        with disable_adapter(model):
            rank_dist, batches = _run(model, dataloader, eva, plan, length, max_batches or 100 * length)
    finally:
        for hook in plan.hooks.values():
            hook.remove()
    out = {}
    for name, rank in rank_dist.items():
        hook = plan.hooks.get(plan.leader[name])
        if hook is None:
            continue
        u = hook.pca.components[:rank]
        if eva.whiten:
            u = u / hook.pca.singular_values[:rank].sqrt()[:, None]
        out[name] = u.float().contiguous()
    if stats is not None:
        stats.update(batches=batches, bytes=plan.meter.bytes)
    return out
