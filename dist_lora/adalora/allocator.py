"""``update_and_allocate``: AdaLoRA's global rank budget over every TP / PP / DP rank.

Semantics are PEFT's ``RankAllocator`` (https://openreview.net/forum?id=lq62uWRJjiY), called after
each optimizer step with the step's gradients still in ``.grad``:

* importance ``I = |p * grad|`` of every element of Q (``lora_A``), Lambda (``lora_E``) and P
  (``lora_B``); sensitivity ``S = beta1 S + (1 - beta1) I``, uncertainty
  ``U = beta2 U + (1 - beta2) |I - S|``; element score ``S * U``. These are elementwise, so each
  rank keeps them for its own shard only.
* triplet score ``s_k = score(Lambda_k) + mean_in score(Q_k,:) + mean_out score(P_:,k)``. A mean
  over a sharded dimension (``in`` of row layers, ``out`` of column layers) is the TP all-reduce
  of the local sums divided by the global size: one all-reduce per call for all layers.
* budget: ``init_r`` triplets per module until ``tinit``, then a cubic decrease to
  ``target_r`` per module at ``total_step - tfinal`` (pruning every ``deltaT`` steps); then the
  pattern is fixed and re-applied each step.
* one threshold, the ``(init_budget - budget)``-th smallest score over **all triplets of all
  modules of all TP and PP ranks**: the scores are exchanged over the pipeline group (TP ranks
  already agree after the all-reduce); Lambda entries at or below it are zeroed.

Data-parallel replicas agree because ``finalize_grads`` averages the gradients first; the
allocator checks that the scores it masks with are bitwise equal on the DP replicas and fails
(on every rank) if they are not. The learned pattern is stored in the adapter's config as
``rank_pattern`` (``"<HF module>.lora_E": [kept, ...]``, PEFT's saved form) on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dist_lora.adalora.layers import adalora_config, dp_group, pp_group, svd_factors
from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.parallel.agreement import RankError, check_same_on_all_ranks, digest, on_every_rank, raise_if_any
from dist_lora.parallel.collectives import all_gather_object, all_reduce_
from dist_lora.parallel.device import collective_device

_ATTR = "dist_lora_adalora_allocators"
_ROLES = ("lora_A", "lora_E", "lora_B")


@dataclass
class AllocatorState:
    """EMAs of one adapter (local shards, keyed by (module, role)) and its global budgets."""

    init_budget: int
    target_budget: int
    sensitivity: dict = field(default_factory=dict)
    uncertainty: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.sensitivity.clear()
        self.uncertainty.clear()


def existing_state(model: nn.Module, adapter_name: str) -> AllocatorState | None:
    """The allocator of ``adapter_name`` if ``update_and_allocate`` (or a restore) created it."""
    return getattr(model, _ATTR, {}).get(adapter_name)


def allocator_state(model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> AllocatorState:
    """The allocator of ``adapter_name``, created on first use (collective over PP)."""
    states = getattr(model, _ATTR, None)
    if states is None:
        states = {}
        object.__setattr__(model, _ATTR, states)
    if adapter_name not in states:
        local = [(name, f.r) for name, _, f in svd_factors(model, adapter_name)]
        group = pp_group(model)
        everyone = [m for part in (all_gather_object(local, group) if group is not None else [local]) for m in part]
        states[adapter_name] = AllocatorState(sum(r for _, r in everyone), config.target_r * len(everyone))
    return states[adapter_name]


def budget_schedule(config: AdaLoraConfig, state: AllocatorState, step: int) -> tuple[int, bool]:
    """(budget, whether to mask at this step): PEFT's cubic schedule."""
    if step <= config.tinit:
        return state.init_budget, False
    if step > config.total_step - config.tfinal:
        return state.target_budget, True
    progress = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    budget = int((state.init_budget - state.target_budget) * progress ** 3 + state.target_budget)
    return budget, step % config.deltaT == 0


@torch.no_grad()
def _update_importance(model: nn.Module, adapter_name: str, config: AdaLoraConfig, state: AllocatorState) -> None:
    error = None
    tensors = [(name, role, getattr(f, role)) for name, _, f in svd_factors(model, adapter_name) for role in _ROLES]
    missing = [f"{name}.{role}" for name, role, p in tensors if p.grad is None]
    if missing:
        error = RuntimeError(f"update_and_allocate needs this step's gradients but {missing[0]} has none: call it "
                             f"after backward (and finalize_grads / optimizer.step) and before optimizer.zero_grad()")
    raise_if_any(error, what="update_and_allocate")
    for name, role, p in tensors:
        importance = (p * p.grad).abs()
        key = (name, role)
        if key not in state.sensitivity:
            state.sensitivity[key] = torch.zeros_like(p)
            state.uncertainty[key] = torch.zeros_like(p)
        s = state.sensitivity[key].mul_(config.beta1).add_(importance, alpha=1 - config.beta1)
        state.uncertainty[key].mul_(config.beta2).add_((importance - s).abs(), alpha=1 - config.beta2)


def _triplet_scores(model: nn.Module, adapter_name: str, state: AllocatorState) -> dict[str, torch.Tensor]:
    """Score [r] of every local module's triplets, complete over TP. Of Q and P exactly one is
    split over TP (Q on row layers, P on column layers); its local sums [r] of all modules go
    through one all-reduce per TP group."""
    parts, pending = {}, {}
    for name, layer, f in svd_factors(model, adapter_name):
        if (name, "lora_E") not in state.sensitivity:
            raise RuntimeError("update_and_allocate has no importance scores yet: it must run with gradients "
                               "at least once before the pattern is computed (do not start at the final step)")
        score = {role: state.sensitivity[(name, role)] * state.uncertainty[(name, role)] for role in _ROLES}
        sums = [score["lora_A"].sum(dim=1), score["lora_B"].sum(dim=0)]  # [r] each
        parts[name] = (score["lora_E"].view(-1), sums, layer.shard.in_features, f.slot.out_features)
        split = 0 if f.a_layout.dim is not None else 1 if f.slot.b_layout.dim is not None else None
        if layer.shard.tp > 1 and split is not None:
            pending.setdefault(id(layer.shard.tp_group), (layer.shard.tp_group, []))[1].append((name, split))
    for group, entries in pending.values():
        total = torch.stack([parts[name][1][split] for name, split in entries])
        all_reduce_(total, group)
        for (name, split), reduced in zip(entries, total):
            parts[name][1][split] = reduced
    return {name: e + sums[0] / n_in + sums[1] / n_out for name, (e, sums, n_in, n_out) in parts.items()}


def _global_pattern(model: nn.Module, scores: dict[str, torch.Tensor], state: AllocatorState,
                    budget: int) -> dict[str, list[bool]]:
    """Kept flags of every module of the whole model (all PP stages), from one global threshold."""
    group = pp_group(model)
    local = {name: s.detach().to("cpu", copy=True) for name, s in scores.items()}  # pickled: host copies
    everything = {}
    for part in all_gather_object(local, group) if group is not None else [local]:
        everything.update(part)
    ordered = sorted(everything)
    k = state.init_budget - budget
    if k <= 0:
        return {f"{name}.lora_E": [True] * everything[name].numel() for name in ordered}
    threshold = torch.kthvalue(torch.cat([everything[n] for n in ordered]), k=k)[0].item()
    return {f"{name}.lora_E": (everything[name] > threshold).tolist() for name in ordered}


def _check_replicas(model: nn.Module, scores: dict[str, torch.Tensor]) -> None:
    group = dp_group(model)
    if group is None:
        return
    try:
        check_same_on_all_ranks(digest({n: s.tolist() for n, s in scores.items()}), group, what="AdaLoRA scores")
    except RankError as err:
        error = RankError(f"{err}: the data-parallel replicas saw different gradients; call "
                          f"dist_lora.models.training.finalize_grads(model) before update_and_allocate")
    else:
        error = None
    raise_if_any(error, what="update_and_allocate")


@torch.no_grad()
def _apply_pattern(model: nn.Module, adapter_name: str, pattern: dict[str, list[bool]]) -> None:
    for name, _, f in svd_factors(model, adapter_name):
        key = f"{name}.lora_E"
        if key not in pattern:
            raise KeyError(f"rank_pattern has no entry {key!r}; it was learned on another model")
        flags = torch.tensor(pattern[key], dtype=torch.bool, device=f.lora_E.device)
        if flags.numel() == f.r:
            f.apply_mask(flags)
        elif f.r != int(flags.sum()):  # shrunk layers hold exactly their kept triplets
            raise ValueError(f"{name} has rank {f.r} but rank_pattern keeps {int(flags.sum())} of {flags.numel()}")


def _check_same_step(global_step: int) -> None:
    """Collective over the whole job: one all-reduce of (step, -step) with max gives the largest
    and smallest step; every rank sees the same pair, so all raise together if they differ."""
    extremes = torch.tensor([global_step, -global_step], dtype=torch.int64, device=collective_device())
    all_reduce_(extremes, None, "max")
    high, low = int(extremes[0]), -int(extremes[1])
    if high != low:
        raise RankError(f"update_and_allocate got different global_step values on different ranks (from {low} "
                        f"to {high}); every rank must pass the same global_step")


def update_and_allocate(model: nn.Module, global_step: int, adapter_name: str = "default") -> dict | None:
    """Update importance, and mask Lambda to the step's global budget; call after the optimizer
    step and before ``zero_grad`` (PEFT's ``AdaLoraModel.update_and_allocate``).

    Collective over the whole job; every rank must pass the same ``global_step``. Returns the rank
    pattern computed at this step (None when the step does not mask); it is also stored in the
    adapter's config. From ``total_step - tfinal`` on, the pattern is fixed and re-applied.
    """
    config = adalora_config(model, adapter_name)
    error = None
    if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
        error = ValueError(f"global_step must be a non-negative integer, got {global_step!r}")
    raise_if_any(error, what="update_and_allocate")
    _check_same_step(global_step)
    state = allocator_state(model, adapter_name, config)
    final = config.total_step - config.tfinal
    if global_step > final:
        error = None if config.rank_pattern is not None else RuntimeError(
            f"step {global_step} is past total_step - tfinal = {final} but no rank_pattern was learned: "
            f"call update_and_allocate at every step (including {final})")
        raise_if_any(error, what="update_and_allocate")
        with on_every_rank("update_and_allocate"):
            _apply_pattern(model, adapter_name, config.rank_pattern)
        return None
    if global_step < final:
        _update_importance(model, adapter_name, config, state)
    budget, mask = budget_schedule(config, state, global_step)
    if not mask and global_step < final:
        return None
    scores = _triplet_scores(model, adapter_name, state)
    _check_replicas(model, scores)
    pattern = _global_pattern(model, scores, state, budget)
    _apply_pattern(model, adapter_name, pattern)
    config.rank_pattern = pattern
    if global_step == final:
        state.reset()
    return pattern
