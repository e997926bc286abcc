"""``apply_adalora``: wrap the targeted linear layers with AdaLoRA (SVD-form) adapters, in place.

Targets are chosen exactly as for LoRA (:func:`dist_lora.adapters.targets.select`); each adapted HF module
gets one :class:`~dist_lora.adalora.factors.SVDFactors` of rank ``init_r`` on the same column /
row parallel wrapper LoRA uses. Megatron's fused ``linear_qkv`` / ``linear_fc1`` must be targeted
by their HF projection names (``q_proj``, ..., ``up_proj``): PEFT's AdaLoRA has one triplet set per
projection, which a single fused adapter cannot reproduce. Embeddings are refused (as in PEFT).
Every check runs on every rank before the model is touched.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dist_lora.adalora.factors import SVDFactors
from dist_lora.adapters.add import Plan, Step, add
from dist_lora.adapters.journal import Journal
from dist_lora.adapters.lora import check_target, ensure_wrapper
from dist_lora.adapters.model import view
from dist_lora.adapters.precision import check_adapter_dtype, placement
from dist_lora.adapters.registry import existing
from dist_lora.adapters.targets import select
from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.init.seeded import seeded_generator


def _initial(config: AdaLoraConfig, shapes: dict, g: torch.Generator) -> dict:
    """PEFT's ``AdaLoraLayer``: ``randn`` for all three; ``init_lora_weights=True`` then sets
    Lambda to zero and P, Q to N(0, 0.02^2)."""
    cpu = torch.device("cpu")  # a CPU generator: the same numbers on every device; load_global moves them
    if not config.init_lora_weights:
        return {k: torch.randn(shapes[k], generator=g, device=cpu) for k in ("lora_A", "lora_E", "lora_B")}
    return {"lora_A": torch.randn(shapes["lora_A"], generator=g, device=cpu) * 0.02,
            "lora_E": torch.zeros(shapes["lora_E"], device=cpu),
            "lora_B": torch.randn(shapes["lora_B"], generator=g, device=cpu) * 0.02}


def plan_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str, seed: int, adapter_dtype=None) -> Plan:
    """Validate on this rank (LoRA's target checks plus AdaLoRA's own); one step per projection."""
    check_adapter_dtype(adapter_dtype)
    if existing(model):
        raise ValueError(f"the model already has adapters {sorted(existing(model))}; AdaLoRA trains exactly one "
                         f"adapter (as in PEFT): apply it to a model without adapters")
    pool, plan = view(model).candidates(), Plan()
    for c in select(model, config):
        if c.kind == "embedding":
            raise ValueError(f"AdaLoRA does not support embedding layers ({c.hf_name}); leave it out of target_modules")
        if c.kind == "expert":
            raise ValueError(f"AdaLoRA on routed experts ({c.hf_name}) is not supported (PEFT's AdaLoRA has no "
                             f"target_parameters); adapt the experts with LoRA, or leave target_parameters out")
        if c.slot.fused is not None:
            raise ValueError(f"AdaLoRA needs one triplet set per projection: target the Hugging Face names "
                             f"({', '.join(c.slot.hf_names)}) instead of the fused layer {c.names[0]}")
        check_target(model, c, config.use_dora, config.lora_bias)
        plan.targets.append(c.hf_name)
        plan.steps.append(Step(partial(_add_triplets, model, pool, config, adapter_name, c, seed, adapter_dtype)))
    return plan


def _add_triplets(model, pool, config: AdaLoraConfig, adapter_name: str, c, seed: int, adapter_dtype,
                  journal: Journal) -> None:
    module = ensure_wrapper(model, pool, c.module_path, journal)
    r, alpha = config.init_r, config.lora_alpha
    factors = SVDFactors(module.shard, c.slot, r, alpha, config.scaling_for(r, alpha), config.lora_dropout,
                         *placement(model, module.base_layer, adapter_dtype))
    g = seeded_generator(seed, adapter_name, c.hf_name, c.slot.key)
    factors.load_global(_initial(config, factors.global_shapes(module.shard), g), module.shard)
    factors.hf_name = c.hf_name
    journal.add_factors(module, adapter_name, c.slot.key, factors)


def apply_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default",
                  seed: int | None = None, adapter_dtype=None) -> nn.Module:
    """Add AdaLoRA adapters (rank ``config.init_r``) to the targets of ``config``; freeze the rest.

    Works on any TP / SP / PP / DP layout of a dist_lora Megatron model and on plain ``torch.nn``
    models. Initial tensors are drawn from a generator seeded by ``seed``, the adapter and the
    module, identically on every rank. Train with :func:`dist_lora.adalora.orth_reg_loss` added to
    the loss and call :func:`dist_lora.update_and_allocate` after each optimizer step. Collective;
    a failure on any rank leaves the model as it was on every rank.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"apply_adalora needs an AdaLoraConfig, got {type(config).__name__}")
    return add(model, config, adapter_name, partial(plan_adalora, adapter_dtype=adapter_dtype), seed,
               what="adding AdaLoRA adapter")
