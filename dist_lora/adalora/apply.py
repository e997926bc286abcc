"""``apply_adalora``: wrap the targeted linear layers with AdaLoRA (SVD-form) adapters, in place.

Targets are chosen exactly as for LoRA (:func:`dist_lora.targets.select`); each adapted HF module
gets one :class:`~dist_lora.adalora.factors.SVDFactors` of rank ``init_r`` on the same column /
row parallel wrapper LoRA uses. Megatron's fused ``linear_qkv`` / ``linear_fc1`` must be targeted
by their HF projection names (``q_proj``, ..., ``up_proj``): PEFT's AdaLoRA has one triplet set per
projection, which a single fused adapter cannot reproduce. Embeddings are refused (as in PEFT).
Every check runs on every rank before the model is touched.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adalora.config import AdaLoraConfig
from dist_lora.adalora.factors import SVDFactors
from dist_lora.apply import _VALID_NAME, _check_matches_somewhere, _ensure_wrapper, default_seed, refresh
from dist_lora.init_methods import seeded_generator
from dist_lora.parallel.collectives import check_same_on_all_ranks, raise_if_any
from dist_lora.registry import registry
from dist_lora.targets import candidates, select


def _initial(config: AdaLoraConfig, shapes: dict, g: torch.Generator) -> dict:
    """PEFT's ``AdaLoraLayer``: ``randn`` for all three; ``init_lora_weights=True`` then sets
    Lambda to zero and P, Q to N(0, 0.02^2)."""
    if not config.init_lora_weights:
        return {k: torch.randn(shapes[k], generator=g) for k in ("lora_A", "lora_E", "lora_B")}
    return {"lora_A": torch.randn(shapes["lora_A"], generator=g) * 0.02, "lora_E": torch.zeros(shapes["lora_E"]),
            "lora_B": torch.randn(shapes["lora_B"], generator=g) * 0.02}


def _plan(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> list:
    if not isinstance(adapter_name, str) or not _VALID_NAME.match(adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    reg = registry(model, create=True)
    if reg.configs:
        raise ValueError(f"the model already has adapters {sorted(reg.configs)}; AdaLoRA trains exactly one "
                         f"adapter (as in PEFT): apply it to a model without adapters")
    chosen = select(model, config)
    for c in chosen:
        if c.kind == "embedding":
            raise ValueError(f"AdaLoRA does not support embedding layers ({c.hf_name}); leave it out of target_modules")
        if c.slot.fused is not None:
            raise ValueError(f"AdaLoRA needs one triplet set per projection: target the Hugging Face names "
                             f"({', '.join(c.slot.hf_names)}) instead of the fused layer {c.names[0]}")
    return chosen


def apply_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default",
                  seed: int | None = None) -> nn.Module:
    """Add AdaLoRA adapters (rank ``config.init_r``) to the targets of ``config``; freeze the rest.

    Works on any TP / SP / PP / DP layout of a dist_lora Megatron model and on plain ``torch.nn``
    models. Initial tensors are drawn from a generator seeded by ``seed``, the adapter and the
    module, identically on every rank. Train with :func:`dist_lora.adalora.orth_reg_loss` added to
    the loss and call :func:`dist_lora.update_and_allocate` after each optimizer step.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"apply_adalora needs an AdaLoraConfig, got {type(config).__name__}")
    config = config.copy()
    config.validate()
    check_same_on_all_ranks((adapter_name, config.to_dict()), what=f"adapter {adapter_name!r} config")
    error, plan = None, []
    try:
        plan = _plan(model, config, adapter_name)
    except (ValueError, TypeError, KeyError) as err:
        error = err
    raise_if_any(error, what=f"adding AdaLoRA adapter {adapter_name!r}")
    _check_matches_somewhere(model, config, [(c, 0, 0) for c in plan], [])
    pool, seed = candidates(model), default_seed(model, seed)
    for c in plan:
        module = _ensure_wrapper(model, pool, c.module_path)
        weight = getattr(module.base_layer, "weight", None)
        dtype = torch.float32 if weight is None or weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        r, alpha = config.init_r, config.lora_alpha
        factors = SVDFactors(module.shard, c.slot, r, alpha, config.scaling_for(r, alpha), config.lora_dropout, dtype)
        g = seeded_generator(seed, adapter_name, c.hf_name, c.slot.key)
        factors.load_global(_initial(config, factors.global_shapes(module.shard), g), module.shard)
        factors.hf_name = c.hf_name
        module.add_factors(adapter_name, c.slot.key, factors)
    reg = registry(model)
    reg.configs[adapter_name] = config
    reg.active = [adapter_name]
    refresh(model)
    return model
