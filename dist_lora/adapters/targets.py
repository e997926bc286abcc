"""Which candidates an adapter config targets, with PEFT's matching rules.

Candidates (:mod:`dist_lora.adapters.candidates`) come from the model seam
(:func:`dist_lora.adapters.model.view`). Matching is PEFT's ``check_target_module_exists``: a
string is a regex matched against the whole name; a list matches a name equal to an entry or
ending in ``.entry``; exclusions, ``layers_to_transform`` / ``layers_pattern`` and
``rank_pattern`` / ``alpha_pattern`` (``(.*\\.)?key$``) work as in PEFT, on the Hugging Face name.

Routed experts are targeted, as in PEFT, only by ``target_parameters``: an entry matches a
fused expert parameter (``model.layers.3.mlp.experts.gate_up_proj``) that equals it or ends in
``.entry``; PEFT applies neither ``exclude_modules`` nor ``layers_to_transform`` to parameters, and
neither do we. LoRA on the router is refused.
"""

from __future__ import annotations

import re

from torch import nn

from dist_lora.adapters.candidates import Candidate
from dist_lora.adapters.model import view
from dist_lora.config.lora import LoraConfig


def _name_matches(targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _layer_ok(config: LoraConfig, name: str) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key``: the first key matching ``(.*\\.)?key$`` wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _excluded(config: LoraConfig, name: str) -> bool:
    if config.exclude_modules and _name_matches(config.exclude_modules, name):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or [])


def targets_module(config: LoraConfig, name: str, kind: str) -> bool:
    """Whether PEFT, given ``config``, adapts the Hugging Face module ``name`` of ``kind``
    (``linear`` | ``output`` | ``embedding``): the rule of :func:`select`, on the HF name alone."""
    targets = config.target_modules if config.target_modules is not None else ["q_proj", "v_proj"]
    if _excluded(config, name):
        return False
    if targets == "all-linear":
        return kind == "linear"
    return _name_matches(targets, name) and _layer_ok(config, name)


def saves_module(config: LoraConfig, name: str) -> bool:
    """Whether ``config.modules_to_save`` names the module ``name`` (PEFT's suffix match)."""
    return any(re.match(rf"(^|.*\.){m}$", name) for m in config.modules_to_save or [])


def leaf_names(model: nn.Module) -> list[str]:
    """Short names of the modules that could be targeted (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for c in view(model).candidates() if c.kind != "expert" for n in c.names})


def _param_matches(targets: list[str], name: str) -> bool:
    """PEFT's ``target_parameters`` rule: the parameter's name equals an entry or ends in ``.entry``."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _expert_parameters(spec) -> tuple[list[str], list[str], list[str]]:
    """(expert parameter names, router parameter names, router module names) of every layer."""
    experts, router_params, router_modules = [], [], []
    for entry in spec.family.weights if spec is not None else ():
        if entry.fused is None:
            continue
        (name,), _ = entry.fused
        for g in range(spec.num_layers):
            if entry.per_expert:
                experts.append(name.format(layer=g))
            elif entry.megatron.endswith("mlp.router.weight"):
                router_params.append(name.format(layer=g))
                router_modules += [name.format(layer=g)[: -len(".weight")],
                                   entry.megatron[: -len(".weight")].format(layer=g)]
    return experts, router_params, router_modules


def _select_experts(pool: list[Candidate], config: LoraConfig, spec) -> list[Candidate]:
    """The routed experts ``target_parameters`` names; every entry must name expert parameters."""
    experts, router_params, router_modules = _expert_parameters(spec)
    targets = config.target_modules
    if targets is not None and targets != "all-linear" and any(_name_matches(targets, n) for n in router_modules):
        raise ValueError(f"target_modules={targets!r} names the mixture-of-experts router (mlp.gate): LoRA on the "
                         f"router is not supported (it would change which experts each token reaches); target the "
                         f"experts with target_parameters and leave the router out")
    for wanted in config.target_parameters or []:
        if any(_param_matches([wanted], n) for n in router_params):
            raise ValueError(f"target_parameters entry {wanted!r} names the mixture-of-experts router: LoRA on the "
                             f"router is not supported; target mlp.experts.gate_up_proj / mlp.experts.down_proj")
        if not any(_param_matches([wanted], n) for n in experts):
            known = sorted({n.split(".", 3)[-1] for n in experts})
            raise ValueError(f"target_parameters entry {wanted!r} names no routed-expert parameter of this model "
                             f"(dist_lora adapts {', '.join(known) or 'no parameters: the model has no experts'} "
                             f"with target_parameters; target linear layers with target_modules)")
    return [c for c in pool if c.kind == "expert" and _param_matches(config.target_parameters or [], c.hf_name)]


def select(model: nn.Module, config: LoraConfig) -> list[Candidate]:
    """The candidates ``config`` targets on this rank (possibly none: under pipeline
    parallelism another stage may hold them); a ``ValueError`` names an inconsistent target."""
    seam = view(model)
    if config.target_parameters and not seam.megatron:
        raise ValueError("target_parameters (LoRA on routed experts) needs a dist_lora Megatron mixture-of-experts "
                         "model (models.from_pretrained); on a plain model use PEFT itself")
    everything = seam.candidates()
    experts = _select_experts(everything, config, seam.spec) if seam.megatron else []
    pool = [c for c in everything if c.kind != "expert"]  # target_modules never names experts (as in PEFT)
    targets = config.target_modules
    if targets is None:  # PEFT's default for the model type, if it has one
        targets = list(seam.spec.family.default_targets or []) if seam.megatron else ["q_proj", "v_proj"]
        if not targets and not config.target_parameters:
            raise ValueError(f"target_modules=None: PEFT has no default target modules for {seam.spec.family.name}; "
                             f"set target_modules (e.g. ['q_proj', 'v_proj']) or target_parameters")
    if targets == "all-linear":
        chosen = [c for c in pool if c.kind == "linear" and c.slot.fused is None
                  and not any(_excluded(config, n) for n in c.names)]
    else:
        chosen = [c for c in pool
                  if any(_name_matches(targets, n) for n in c.names)
                  and not any(_excluded(config, n) for n in c.names)
                  and _layer_ok(config, c.hf_name)]
    by_group: dict[str, set[bool]] = {}
    for c in chosen:
        by_group.setdefault(c.group, set()).add(c.slot.fused is not None)
    mixed = sorted(g for g, kinds in by_group.items() if kinds == {True, False})
    if mixed:
        raise ValueError(f"{mixed[0]} is targeted both as a fused layer and by its projections; "
                         f"use either the Megatron name or the Hugging Face projection names")
    return chosen + experts


def rank_and_alpha(config: LoraConfig, candidate: Candidate) -> tuple[int, float]:
    """The (r, lora_alpha) of a candidate; a fused adapter needs one value over its names."""
    if candidate.slot.fused is None:
        names = (candidate.hf_name,)
    elif any(re.match(rf"(.*\.)?({key})$", candidate.names[0]) for key in {**config.rank_pattern, **config.alpha_pattern}):
        names = candidate.names  # a pattern names the fused Megatron layer itself
    else:
        names = candidate.slot.hf_names
    ranks = {pattern_value(config.rank_pattern, n, config.r) for n in names}
    alphas = {pattern_value(config.alpha_pattern, n, config.lora_alpha) for n in names}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"rank_pattern / alpha_pattern give the projections of the fused layer "
                         f"{candidate.names[0]} different values ({sorted(ranks)}, {sorted(alphas)}); "
                         f"target the Hugging Face projection names to give them their own")
    return ranks.pop(), alphas.pop()
