"""``apply_lora`` / ``add_adapter``: LoRA (rsLoRA, DoRA, weight-driven inits, modules_to_save).

The LoRA planner validates every target on this rank before the model is touched and lists one
build step per adapted slot (wrap the layer if needed, create and initialise the factors, DoRA's
magnitude), per bias wrapper and per ``modules_to_save`` copy; :func:`dist_lora.adapters.add.add`
runs them with rollback on failure (see there).
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from dist_lora.adapters.add import Plan, Step, add
from dist_lora.adapters.candidates import Candidate
from dist_lora.adapters.journal import Journal
from dist_lora.adapters.model import view
from dist_lora.adapters.precision import check_adapter_dtype, placement
from dist_lora.adapters.targets import rank_and_alpha, select
from dist_lora.config.init_names import weight_method
from dist_lora.config.lora import LoraConfig
from dist_lora.init.methods import initial_factors
from dist_lora.init.seeded import seeded_generator
from dist_lora.init.weight import check_weight_init, initialise_from_weight
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.dispatch import describe
from dist_lora.layers.dora import norm_now
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.modules_to_save import ModulesToSave
from dist_lora.layers.sharding import BaseShard, FactorLayout


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                seed: int | None = None, adapter_dtype=None) -> nn.Module:
    """Add an adapter (inactive unless it is the first one); see :func:`apply_lora`."""
    return add(model, config, adapter_name, partial(plan_lora, adapter_dtype=adapter_dtype), seed)


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
               seed: int | None = None, adapter_dtype=None) -> nn.Module:
    """Wrap the layers ``config`` targets with LoRA adapters, in place; freeze everything else.

    Works on a dist_lora Megatron model (any TP / SP / PP / DP layout) and on plain
    ``torch.nn`` models. Factors are initialised from a generator seeded by ``seed`` (default:
    the seed given to ``parallel.initialize``), the adapter name and the module, identically on
    every rank, so replicated factors start equal and the adapter does not depend on the layout.
    They live on the device of the weight they adapt, in ``adapter_dtype``: by default float32
    on a bfloat16 / float16 base (else the base's dtype), ``"base"`` for the base's dtype, or a
    floating dtype (:mod:`dist_lora.adapters.precision`).
    Collective; a failure on any rank leaves the model as it was on every rank.
    """
    return add_adapter(model, config, adapter_name, seed, adapter_dtype)


# -- planning --------------------------------------------------------------------------------


def shard_of(model: nn.Module, path: str) -> BaseShard:
    """How the (possibly already wrapped) layer at ``path`` is sharded."""
    module = model.get_submodule(path)
    return module.shard if isinstance(module, AdapterLayer) else describe(module, view(model).vocab_size)[1]


def check_target(model: nn.Module, c: Candidate, use_dora: bool, lora_bias: bool) -> None:
    """A candidate that a LoRA-family adapter may take (shared by every LoRA-family method)."""
    if c.kind == "expert" and (use_dora or lora_bias):
        option = "use_dora=True" if use_dora else "lora_bias=True"
        raise ValueError(f"{option} is not supported on routed experts ({c.hf_name}), as in PEFT's "
                         f"target_parameters; set {option.split('=')[0]}=False")
    if use_dora and c.kind == "embedding":
        raise ValueError(f"DoRA is not supported on embedding layers ({c.hf_name}); leave it out of "
                         f"target_modules or set use_dora=False")
    if isinstance(model.get_submodule(c.module_path), ModulesToSave):
        raise ValueError(f"{c.hf_name} is a modules_to_save module of another adapter; it cannot get LoRA")
    if lora_bias and c.kind == "embedding":
        raise ValueError(f"lora_bias=True is not supported on embedding layers ({c.hf_name})")


def plan_lora(model: nn.Module, config: LoraConfig, adapter_name: str, seed: int, adapter_dtype=None) -> Plan:
    """Validate ``config`` (and ``adapter_dtype``) against this rank's part of ``model``; the steps
    that add it."""
    check_adapter_dtype(adapter_dtype)
    pool = view(model).candidates()
    plan = Plan()
    weight_driven = weight_method(config.init_lora_weights) is not None
    for c in select(model, config):
        check_target(model, c, config.use_dora, config.lora_bias)
        r, alpha = rank_and_alpha(config, c)
        shard = shard_of(model, c.module_path)
        if c.kind == "expert" and (weight_driven or config.init_lora_weights == "eva"):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not supported on routed experts "
                             f"({c.hf_name}); use True, False or 'gaussian'")
        if weight_driven:
            check_weight_init(config, c, shard, r)
        communicates = shard.tp > 1 and (weight_driven or (config.use_dora and shard.kind == "row"))
        plan.targets.append(c.hf_name)
        plan.steps.append(Step(partial(_add_slot, model, pool, config, adapter_name, c, r, alpha, seed, adapter_dtype),
                               shard.tp_group if communicates else None))
    if config.bias == "all" and view(model).megatron:
        # Megatron drops the bias gradient of frozen-weight column layers; the wrapper restores it.
        for c in pool:
            if c.slot.key == "all" and c.kind == "linear" and getattr(model.get_submodule(c.module_path),
                                                                       "bias", None) is not None:
                plan.steps.append(Step(partial(_bias_wrapper, model, pool, c.module_path)))
    for c in _saved_candidates(model, config, pool):
        plan.saved.append(c.names)
        plan.steps.append(Step(partial(_add_copy, model, adapter_name, c)))
    return plan


def _saved_candidates(model: nn.Module, config: LoraConfig, pool: list[Candidate]) -> list[Candidate]:
    saved = []
    for wanted in config.modules_to_save or []:
        hits = [c for c in pool if c.slot.fused is None and c.slot.block is None
                and any(re.match(rf"(^|.*\.){wanted}$", n) for n in c.names)]
        for c in hits:
            if isinstance(model.get_submodule(c.module_path), AdapterLayer):
                raise ValueError(f"{c.hf_name} carries LoRA adapters; it cannot also be in modules_to_save")
            if c.kind == "embedding" and view(model).megatron:
                raise ValueError("modules_to_save on the Megatron word embedding is not supported; "
                                 "target it with LoRA instead")
            saved.append(c)
    return saved


# -- building (through the journal) ------------------------------------------------------------


def shared_weight(model: nn.Module, module: nn.Module) -> torch.Tensor | None:
    """The weight a layer computes with (a tied Megatron output layer reads the embedding's)."""
    weight = getattr(module, "weight", None)
    if weight is None and hasattr(model, "shared_embedding_or_output_weight"):
        weight = model.shared_embedding_or_output_weight()
    return weight


def ensure_wrapper(model: nn.Module, pool: list[Candidate], path: str, journal: Journal) -> AdapterLayer:
    """The adapter wrapper at ``path``, created (with every slot the layer offers) if needed."""
    module = model.get_submodule(path)
    if isinstance(module, AdapterLayer):
        return module
    wrapper_cls, shard = describe(module, view(model).vocab_size)
    siblings = [c for c in pool if c.module_path == path]
    whole = next(c for c in siblings if c.slot.key == "all")
    wrapper = wrapper_cls(module, shard, {c.slot.key: c.slot for c in siblings}, whole.slot.hf_names, whole.slot.fused)
    wrapper.global_name = whole.global_name
    if whole.expert is not None:
        wrapper.expert = whole.expert
    journal.set_module(path, wrapper)
    return wrapper


def _add_slot(model, pool, config: LoraConfig, adapter_name: str, c: Candidate, r: int, alpha: float, seed: int,
              adapter_dtype, journal: Journal) -> None:
    module = ensure_wrapper(model, pool, c.module_path, journal)
    factors = LoraFactors(module.shard, c.slot, r, alpha, config.scaling_for(r, alpha), config.lora_dropout,
                          config.lora_bias, config.use_dora, *placement(model, module.base_layer, adapter_dtype))
    kind = "embedding" if module.shard.kind == "embedding" else "linear"
    name = c.hf_name if c.expert is None else f"{c.hf_name}[{c.expert}]"  # each expert draws its own
    full = initial_factors(config.init_lora_weights, factors.global_shapes(module.shard), kind, r, seed,
                           adapter_name, name, c.slot.key)
    factors.load_global(full, module.shard)
    if c.expert is not None:
        for param in factors.parameters():
            param.allreduce = False  # Megatron's mark of expert parameters: reduced over expert-data-parallel
    if weight_method(config.init_lora_weights) is not None:  # PiSSA / OLoRA / LoftQ: rewrites the base rows
        journal.keep(module.base_weight())
        initialise_from_weight(module, factors, c.slot, config,
                               seeded_generator(seed, adapter_name, c.hf_name, c.slot.key, "weight"))
    if config.use_dora:
        with torch.no_grad():
            factors.lora_magnitude_vector.copy_(norm_now(module, factors))
    bias = getattr(module.base_layer, "bias", None)
    if config.bias == "lora_only" and bias is not None and module.shard.kind != "embedding":
        factors.own_bias(c.slot.select(bias))  # only this slot's rows train (layers/bias.py)
    journal.add_factors(module, adapter_name, c.slot.key, factors)


def _bias_wrapper(model, pool, path: str, journal: Journal) -> None:
    ensure_wrapper(model, pool, path, journal)


def _add_copy(model, adapter_name: str, c: Candidate, journal: Journal) -> None:
    module = model.get_submodule(c.module_path)
    if not isinstance(module, ModulesToSave):
        _, shard = describe(module, view(model).vocab_size)
        layout = c.slot.b_layout if c.kind == "output" else FactorLayout()
        module = ModulesToSave(module, shard, layout)
        module.global_name = c.global_name
        module.hf_name = c.hf_name
        journal.set_module(c.module_path, module)
    journal.add_copy(module, adapter_name, shared_weight(model, module.base_layer))
