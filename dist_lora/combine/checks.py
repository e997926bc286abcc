"""Validation of ``add_weighted_adapter`` arguments, and the plan of what to combine where.

Everything here is local and writes nothing: the caller agrees on errors across ranks
(``raise_if_any``) before the model is touched. Rules follow PEFT's
``_check_add_weighted_adapter`` (new rank, target modules, modules_to_save), plus clear errors
where PEFT fails late or silently (missing ``density``, wrong ``weights`` length, a module of the
new adapter that no source adapter covers, per-module ranks that differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from dist_lora.adapters.registry import registry, saved_modules
from dist_lora.adapters.targets import select
from dist_lora.combine.task_arithmetic import MERGES
from dist_lora.config.lora import LoraConfig
from dist_lora.layers.adapter_layer import AdapterLayer

SVD_TYPES = ("svd",) + tuple(f"{m}_svd" for m in MERGES if m != "linear")
COMBINATION_TYPES = ("cat",) + tuple(MERGES) + SVD_TYPES
NEEDS_DENSITY = tuple(t for t in COMBINATION_TYPES if MERGES.get(t.removesuffix("_svd"), (None,))[0])
EQUAL_RANKS = tuple(MERGES)
_FUSED_OK = ("cat", "linear")  # types whose result keeps the fused adapter's shared A exact


@dataclass
class Plan:
    combination_type: str
    rank: int
    config: LoraConfig
    # (layer, slot key, [(position in ``adapters``, weight, source factors)])
    slots: list = field(default_factory=list)


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _check_arguments(adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                     majority_sign_method, configs) -> None:
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        raise ValueError(f"adapter(s) {unknown} do not exist; adapters: {sorted(configs)}")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name or delete it first")
    experts = [a for a in adapters if configs[a].target_parameters]
    if experts:
        raise ValueError(f"adapter(s) {experts} adapt routed experts (target_parameters); add_weighted_adapter does "
                         f"not combine them (PEFT refuses them too)")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list with one number per adapter ({len(adapters)}), got {weights!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is unknown; choose one of {list(COMBINATION_TYPES)}")
    if combination_type in NEEDS_DENSITY and len(adapters) > 1:  # one adapter: always linear
        if density is None:
            raise ValueError(f"combination_type={combination_type!r} needs density (the fraction of values "
                             f"kept, in [0, 1])")
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 <= density <= 1:
            raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and (not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp is a quantile in [0, 1] or None, got {svd_clamp!r}")


def _new_targets(configs: list[LoraConfig]):
    """PEFT's union of the target modules: sets are united, regexes joined with ``|``."""
    targets = [c.target_modules if c.target_modules is not None else ["q_proj", "v_proj"] for c in configs]
    if all(t == targets[0] for t in targets):
        return targets[0]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ValueError("all adapters must give target_modules the same way: a mix of lists and regex "
                         "strings cannot be combined")
    if isinstance(targets[0], str):
        if "all-linear" in targets:
            raise ValueError("target_modules='all-linear' cannot be combined with other target_modules")
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def _new_config(configs: list[LoraConfig], rank: int) -> LoraConfig:
    config = configs[0].copy()
    config.r, config.lora_alpha = rank, rank
    config.target_modules = _new_targets(configs)
    config.rank_pattern, config.alpha_pattern = {}, {}
    config.init_lora_weights = True
    return config


def _new_rank(combination_type: str, ranks: list[int], svd_rank: int | None) -> int:
    if combination_type in EQUAL_RANKS:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} needs adapters of equal rank, got ranks "
                             f"{ranks}; use 'cat' or an SVD type ('svd', 'ties_svd', ...)")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _check_modules_to_save(model: nn.Module, adapters: list[str]) -> None:
    for name, module in saved_modules(model):
        if sum(a in module.copies for a in set(adapters)) > 1:
            raise ValueError(f"{name} is a modules_to_save module of several of {adapters}; such adapters "
                             f"cannot be combined")


def _slot_sources(model: nn.Module, plan: Plan, adapters: list[str], weights: list[float], config_new) -> None:
    for c in select(model, config_new):
        layer = model.get_submodule(c.module_path)
        present = {a: layer.factors_of(a) for a in adapters} if isinstance(layer, AdapterLayer) else {}
        sources = [(i, float(w), present[a][c.slot.key]) for i, (a, w) in enumerate(zip(adapters, weights))
                   if c.slot.key in present.get(a, {})]
        if not sources:
            raise ValueError(f"{c.hf_name} is targeted by the combined target_modules but none of {adapters} "
                             f"adapts it (as {c.names[0]}); give the adapters consistent target_modules")
        if c.slot.fused is not None and plan.combination_type not in _FUSED_OK:
            raise ValueError(f"{c.names[0]} carries a fused adapter (one A shared by {', '.join(c.slot.hf_names)}); "
                             f"combination_type={plan.combination_type!r} gives each projection its own A. "
                             f"Use 'linear' / 'cat', or adapters on the projection names")
        if plan.combination_type in EQUAL_RANKS and any(f.r != plan.rank for _, _, f in sources):
            ranks = {adapters[i]: f.r for i, _, f in sources}
            raise ValueError(f"{c.hf_name}: combination_type={plan.combination_type!r} needs rank {plan.rank} "
                             f"on every module, got {ranks}")
        plan.slots.append((layer, c.slot.key, sources))


def plan_combination(model: nn.Module, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                     density, majority_sign_method) -> Plan:
    """Validate the arguments against ``model`` (this rank's part) and return the plan."""
    configs = registry(model).configs
    _check_arguments(adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                     majority_sign_method, configs)
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one adapter can only be scaled
    sources = [configs[a] for a in adapters]
    rank = _new_rank(combination_type, [_max_rank(c) for c in sources], svd_rank)
    _check_modules_to_save(model, adapters)
    plan = Plan(combination_type, rank, _new_config(sources, rank))
    _slot_sources(model, plan, adapters, weights, plan.config)
    return plan
