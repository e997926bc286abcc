"""``apply_lora`` / ``add_adapter``: wrap the targeted layers of a model and freeze the rest.

Every check runs before the model is touched, so a bad config leaves the model as it was; the
config is compared across all ranks first, so ranks that disagree fail together instead of
waiting in different collectives.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dist_lora.config import LoraConfig
from dist_lora.dispatch import describe
from dist_lora.init import check_weight_init, initialise_from_weight
from dist_lora.init_methods import seeded_generator, initial_factors, weight_method
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.dora import row_norm
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.modules_to_save import ModulesToSave
from dist_lora.layers.sharding import FactorLayout
from dist_lora.parallel.collectives import all_gather_object, check_same_on_all_ranks, raise_if_any
from dist_lora.registry import adapter_layers, registry, saved_modules, wrappers
from dist_lora.targets import Candidate, candidates, leaf_names, rank_and_alpha, select

_VALID_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _vocab_size(model: nn.Module) -> int | None:
    info = getattr(model, "dist_lora", None)
    return info.spec.vocab_size if info is not None else None


def default_seed(model: nn.Module, seed: int | None) -> int:
    """``seed``, or the seed given to ``parallel.initialize`` (0 for plain models)."""
    if seed is not None:
        return seed
    info = getattr(model, "dist_lora", None)
    return info.groups.seed if info is not None else 0


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _plan(model: nn.Module, config: LoraConfig, adapter_name: str) -> tuple[list, list]:
    """Validate everything and return (LoRA candidates with (r, alpha), modules_to_save candidates)."""
    if not isinstance(adapter_name, str) or not _VALID_NAME.match(adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    reg = registry(model, create=True)
    if adapter_name in reg.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {sorted(reg.configs)}")
    chosen = select(model, config)
    plan = []
    for c in chosen:
        if config.use_dora and c.kind == "embedding":
            raise ValueError(f"DoRA is not supported on embedding layers ({c.hf_name}); leave it out of "
                             f"target_modules or set use_dora=False")
        current = model.get_submodule(c.module_path)
        if isinstance(current, ModulesToSave):
            raise ValueError(f"{c.hf_name} is a modules_to_save module of another adapter; it cannot get LoRA")
        if config.lora_bias and c.kind == "embedding":
            raise ValueError(f"lora_bias=True is not supported on embedding layers ({c.hf_name})")
        r, alpha = rank_and_alpha(config, c)
        if weight_method(config.init_lora_weights) is not None:
            shard = current.shard if isinstance(current, AdapterLayer) else describe(current, _vocab_size(model))[1]
            check_weight_init(config, c, shard, r)
        plan.append((c, r, alpha))
    saved = []
    for wanted in config.modules_to_save or []:
        hits = [c for c in candidates(model) if c.slot.fused is None and c.slot.rows is None
                and any(re.match(rf"(^|.*\.){wanted}$", n) for n in c.names)]
        for c in hits:
            module = model.get_submodule(c.module_path)
            if isinstance(module, AdapterLayer):
                raise ValueError(f"{c.hf_name} carries LoRA adapters; it cannot also be in modules_to_save")
            if c.kind == "embedding" and hasattr(model, "dist_lora"):
                raise ValueError("modules_to_save on the Megatron word embedding is not supported; "
                                 "target it with LoRA instead")
            saved.append(c)
    return plan, saved


def _check_matches_somewhere(model: nn.Module, config: LoraConfig, plan, saved) -> None:
    """Collective: under pipeline parallelism a stage may match nothing; the job as a whole must."""
    found = all_gather_object(([c.hf_name for c, _, _ in plan], [c.names for c in saved]))
    if not any(targets for targets, _ in found):
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; modules that "
                         f"could match: {', '.join(leaf_names(model))}")
    names = [n for _, groups in found for group in groups for n in group]
    for wanted in config.modules_to_save or []:
        if not any(re.match(rf"(^|.*\.){wanted}$", n) for n in names):
            raise ValueError(f"modules_to_save entry {wanted!r} matched no module; modules that could "
                             f"match: {', '.join(leaf_names(model))}")


def _shared_weight(model: nn.Module, module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if weight is None and hasattr(model, "shared_embedding_or_output_weight"):
        weight = model.shared_embedding_or_output_weight()
    return weight


def _ensure_wrapper(model: nn.Module, pool: list[Candidate], path: str) -> AdapterLayer:
    """The adapter wrapper at ``path``, created (with every slot the layer offers) if needed."""
    module = model.get_submodule(path)
    if isinstance(module, AdapterLayer):
        return module
    wrapper_cls, shard = describe(module, _vocab_size(model))
    siblings = [c for c in pool if c.module_path == path]
    whole = next(c for c in siblings if c.slot.key == "all")
    wrapper = wrapper_cls(module, shard, {c.slot.key: c.slot for c in siblings}, whole.slot.hf_names, whole.slot.fused)
    wrapper.global_name = whole.global_name
    _set_module(model, path, wrapper)
    return wrapper


def _build(model: nn.Module, config: LoraConfig, adapter_name: str, plan, saved, seed: int) -> None:
    pool = candidates(model)
    for c, r, alpha in plan:
        module = _ensure_wrapper(model, pool, c.module_path)
        weight = _shared_weight(model, module.base_layer)
        dtype = torch.float32 if weight is None or weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factors = LoraFactors(module.shard, c.slot, r, alpha, config.scaling_for(r, alpha), config.lora_dropout,
                              config.lora_bias, config.use_dora, dtype)
        kind = "embedding" if module.shard.kind == "embedding" else "linear"
        full = initial_factors(config.init_lora_weights, factors.global_shapes(module.shard), kind, r, seed,
                               adapter_name, c.hf_name, c.slot.key)
        factors.load_global(full, module.shard)
        if weight_method(config.init_lora_weights) is not None:  # PiSSA / OLoRA / LoftQ: rewrites the base rows
            initialise_from_weight(module, factors, c.slot, config,
                                   seeded_generator(seed, adapter_name, c.hf_name, c.slot.key, "weight"))
        if config.use_dora:
            with torch.no_grad():
                norm = row_norm(module._read_rows(c.slot), factors.delta_weight(), module.shard)
                factors.lora_magnitude_vector.copy_(norm)
        module.add_factors(adapter_name, c.slot.key, factors)
    if config.bias == "all" and hasattr(model, "dist_lora"):
        # Megatron drops the bias gradient of frozen-weight column layers; the wrapper restores it.
        for c in pool:
            module = model.get_submodule(c.module_path)
            if (c.slot.key == "all" and c.kind == "linear" and getattr(module, "bias", None) is not None
                    and not isinstance(module, AdapterLayer)):
                _ensure_wrapper(model, pool, c.module_path)
    vocab = _vocab_size(model)
    for c in saved:
        module = model.get_submodule(c.module_path)
        if not isinstance(module, ModulesToSave):
            _, shard = describe(module, vocab)
            layout = c.slot.b_layout if c.kind == "output" else FactorLayout()
            module = ModulesToSave(module, shard, layout)
            module.global_name = c.global_name
            module.hf_name = c.hf_name
            _set_module(model, c.module_path, module)
        module.add_copy(adapter_name, _shared_weight(model, module.base_layer))


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                seed: int | None = None) -> nn.Module:
    """Add an adapter (inactive unless it is the first one); see :func:`apply_lora`."""
    config = config.copy()
    config.validate()
    check_same_on_all_ranks((adapter_name, config.to_dict()), what=f"adapter {adapter_name!r} config")
    error, plan = None, None
    try:
        plan = _plan(model, config, adapter_name)
    except (ValueError, TypeError, KeyError) as err:
        error = err
    raise_if_any(error, what=f"adding adapter {adapter_name!r}")
    _check_matches_somewhere(model, config, *plan)
    _build(model, config, adapter_name, *plan, seed=default_seed(model, seed))
    reg = registry(model)
    reg.configs[adapter_name] = config
    if not reg.active:
        reg.active = [adapter_name]
    refresh(model)
    return model


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
               seed: int | None = None) -> nn.Module:
    """Wrap the layers ``config`` targets with LoRA adapters, in place; freeze everything else.

    Works on a dist_lora Megatron model (any TP / SP / PP / DP layout) and on plain
    ``torch.nn`` models. Factors are initialised from a generator seeded by ``seed`` (default:
    the seed given to ``parallel.initialize``), the adapter name and the module, identically on
    every rank, so replicated factors start equal and the adapter does not depend on the layout.
    """
    return add_adapter(model, config, adapter_name, seed)


def refresh(model: nn.Module) -> None:
    """Apply the registry's active set to every wrapper and make exactly the active adapters'
    parameters (plus biases chosen by ``bias``) trainable."""
    reg = registry(model)
    for _, module in wrappers(model):
        module.set_active(reg.active)
        module.disabled = reg.disabled
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for adapter in reg.active:
            for factors in layer.factors_of(adapter).values():
                for param in factors.parameters():
                    param.requires_grad_(True)
    for _, module in saved_modules(model):
        for adapter in reg.active:
            if adapter in module.copies:
                module.copies[adapter].requires_grad_(True)
    _refresh_biases(model, reg)


def _refresh_biases(model: nn.Module, reg) -> None:
    modes = {reg.configs[a].bias for a in reg.active}
    if "all" in modes:
        for name, param in model.named_parameters():
            if name.endswith(".bias") and ".lora." not in name and ".copies." not in name:
                param.requires_grad_(True)
    for _, layer in adapter_layers(model):
        handle = getattr(layer, "_bias_mask_hook", None)
        if handle is not None:
            handle.remove()
            layer._bias_mask_hook = None
        bias = getattr(layer.base_layer, "bias", None)
        if "lora_only" not in modes or "all" in modes or bias is None:
            continue
        slots = [layer.slots[k] for a in reg.active if reg.configs[a].bias == "lora_only"
                 for k in layer.factors_of(a)]
        if not slots:
            continue
        bias.requires_grad_(True)
        if all(s.rows is not None for s in slots):  # only some projections of a fused bias
            mask = torch.zeros_like(bias)
            for s in slots:
                mask[s.rows] = 1
            layer._bias_mask_hook = bias.register_hook(lambda grad, mask=mask: grad * mask)
