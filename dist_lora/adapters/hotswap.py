"""Hotswapping: another LoRA adapter's weights copied into a loaded adapter, in place.

The serving / evaluation loop of PEFT's ``hotswap_adapter`` and Transformers'
``load_adapter(..., hotswap=True)``: one adapter is loaded, later ones overwrite its tensors, so
no memory is allocated per adapter and, after :func:`enable_hotswap`, torch.compile does not
recompile (PEFT's ``prepare_model_for_compiled_hotswap``).

:func:`enable_hotswap` pads every LoRA factor to ``target_rank`` R (zero rows of A, zero
columns of B: the output is unchanged) and turns every scaling into a 0-dim tensor; it also
remembers R, so that adapters loaded later by ``import_peft`` / ``load_adapter`` are padded as
they are loaded. A swap (:func:`apply_swap`, planned by :mod:`dist_lora.checkpoint.hotswap`) then
copies values into the existing storage (A ``[:r]``, B ``[:, :r]``, the rest zeroed) and fills
the scaling tensor; the parameters, their shapes and the Python values the forward reads stay
the same. A module the swapped-in adapter does not target becomes *vacant* (zeros, ``r = 0``).

Sharding: the rank dimension is never split, so each rank pads and fills its own shards (A
[R, in/p] on row-parallel layers, B [out/p, R] on column-parallel ones) without communication.

Limits (as in PEFT): LoRA only (no DoRA, AdaLoRA or other methods), no new target modules, no
rank above the padded one, not while merged; also here: the same ``lora_bias``,
``modules_to_save`` and ``bias="none"`` as the loaded adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dist_lora.adapters.registry import adapter_layers, existing, registry, require_adapter, wrappers
from dist_lora.config.lora import LoraConfig
from dist_lora.integrations.deepspeed import is_partitioned
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel.agreement import on_every_rank

_ATTR = "dist_lora_hotswap_rank"
AUTO = "auto"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def hotswap_rank(model: nn.Module) -> int | None:
    """The ``target_rank`` given to :func:`enable_hotswap` (``None``: not enabled)."""
    return getattr(unwrap_compiled(model), _ATTR, None)


def swappable(config: LoraConfig) -> bool:
    """Whether adapters of ``config`` can be padded and swapped (plain LoRA / rsLoRA, not on
    routed experts, whose PEFT tensors pack every expert's rank rows)."""
    return (type(config) is LoraConfig and config.peft_type == "LORA" and not config.use_dora
            and not config.target_parameters)


def _method(config: LoraConfig) -> str:
    if config.target_parameters:
        return "LoRA on routed experts (target_parameters)"
    return "DoRA" if config.use_dora and config.peft_type == "LORA" else config.peft_type


def enable_hotswap(model: nn.Module, target_rank: int = 128) -> None:
    """Prepare ``model`` for hotswapping adapters of rank up to ``target_rank`` without
    reallocating anything (and without torch.compile recompiling).

    Call it before ``torch.compile`` and either before the first adapter is loaded (adapters
    that ``import_peft`` / ``load_adapter`` load later are padded then) or after (the model's LoRA
    adapters are padded now). Afterwards ``import_peft`` / ``load_adapter`` swap into an adapter
    of the same name by default (``hotswap="auto"``). ``target_rank`` should be the highest rank
    among the adapters to be loaded (128 if not given, as in Transformers).

    Every plain LoRA / rsLoRA factor gets ``target_rank`` rank rows (zeros beyond its own) and a
    0-dim tensor scaling; DoRA and AdaLoRA adapters, which cannot be swapped, are left as they
    are. Works on Megatron models at any TP / SP / PP layout (each rank pads its own shards, no
    communication) and on plain models, not under ZeRO-3 (partitioned parameters cannot be
    reshaped in place). Collective in that a failure on any rank raises on every rank and
    changes nothing.
    """
    if hasattr(model, "_orig_mod"):
        raise ValueError("enable_hotswap got a torch.compile'd model; call it before torch.compile (the padded "
                         "tensors would otherwise recompile the model)")
    with on_every_rank("enable_hotswap"):
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank <= 0:
            raise ValueError(f"target_rank must be a positive integer, got {target_rank!r}")
        factors = _swappable_factors(model, existing(model))
        _check_capacity(factors, target_rank, "enable_hotswap")
    _prepare(factors, target_rank)
    setattr(model, _ATTR, target_rank)


def _swappable_factors(model: nn.Module, configs: dict[str, LoraConfig]) -> list[tuple[str, str, LoraFactors]]:
    """(adapter, HF name, factors) of every swappable adapter in ``configs`` on this rank."""
    _refuse_partitioned(model)
    out = []
    names = [a for a, c in configs.items() if swappable(c)]
    for _, layer in adapter_layers(model):
        for adapter in names:
            for factors in layer.factors_of(adapter).values():
                out.append((adapter, factors.slot.hf_names[0], factors))
    return out


def _refuse_partitioned(model: nn.Module) -> None:
    for _, module in wrappers(model):
        if any(is_partitioned(p) for p in module.parameters()):
            raise ValueError("hotswapping is not supported under DeepSpeed ZeRO-3 (partitioned adapter tensors "
                             "cannot be padded or overwritten in place); serve the adapters on an unpartitioned model")


def _check_capacity(factors, target_rank: int, what: str) -> None:
    over = [(f.capacity, adapter, hf) for adapter, hf, f in factors if f.capacity > target_rank]
    if over:
        rank, adapter, hf = max(over)
        raise ValueError(f"{what}: adapter {adapter!r} has rank {rank} on {hf}, above target_rank={target_rank}; "
                         f"pass target_rank >= {rank} (the highest rank of all adapters to be swapped)")


def _prepare(factors, target_rank: int) -> None:
    for _, _, f in factors:
        f.pad_rank(target_rank)
        f.scaling_as_tensor()


def check_fits(model: nn.Module, config: LoraConfig, ranks: dict[str, int], source: str) -> None:
    """Before loading a new adapter (``ranks``: module -> rank) into a model whose hotswap is
    enabled: its ranks must not exceed ``target_rank`` (raises here, before anything changes)."""
    target = hotswap_rank(model)
    if target is None or not swappable(config):
        return
    over = {m: r for m, r in ranks.items() if r > target}
    if over:
        module, rank = max(over.items(), key=lambda kv: kv[1])
        raise ValueError(f"{source} has rank {rank} on {module}, above target_rank={target} given to enable_hotswap; "
                         f"call enable_hotswap(model, target_rank={rank}) (or higher) before loading the first adapter")


def prepare_loaded(model: nn.Module, adapter_name: str) -> None:
    """Pad a just-loaded adapter as :func:`enable_hotswap` padded the others (no-op if not enabled
    or not swappable); :func:`check_fits` has checked its ranks."""
    target = hotswap_rank(model)
    config = existing(model).get(adapter_name)
    if target is None or config is None:
        return
    _prepare(_swappable_factors(model, {adapter_name: config}), target)


def refuse_padded(model: nn.Module, adapter_name: str, what: str) -> None:
    """Raise if ``adapter_name`` holds tensors wider than its rank (padded or swapped): ``what``
    (e.g. training checkpoints, whose optimizer state follows whole parameters) needs them exact."""
    for _, layer in adapter_layers(model):
        for f in layer.factors_of(adapter_name).values():
            if f.capacity != f.r:
                raise ValueError(f"{what} of adapter {adapter_name!r} are not supported once it is padded or swapped "
                                 f"for hotswapping ({f.slot.hf_names[0]}: rank {f.r} in tensors of rank {f.capacity}); "
                                 f"save it with save_adapter / export_peft")


def resolve_hotswap(model: nn.Module, adapter_name: str, hotswap) -> bool:
    """Whether a load swaps into ``adapter_name``: ``"auto"`` (the default) when hotswap is
    enabled and the adapter exists, as in Transformers; ``True`` needs the adapter."""
    present = adapter_name in existing(model)
    if hotswap == AUTO:
        return present and hotswap_rank(model) is not None
    if hotswap is True:
        if not present:
            raise ValueError(f"hotswap=True swaps into a loaded adapter, but the model has no adapter {adapter_name!r} "
                             f"(adapters: {sorted(existing(model))}); load the first adapter with hotswap=False")
        return True
    if hotswap is False:
        return False
    raise ValueError(f"hotswap must be True, False or 'auto', got {hotswap!r}")


def check_swappable(model: nn.Module, adapter_name: str, config: LoraConfig) -> LoraConfig:
    """Raise if ``config``'s adapter cannot be swapped into ``adapter_name``; returns the current config."""
    current = require_adapter(model, adapter_name)
    if not swappable(current):
        raise ValueError(f"adapter {adapter_name!r} is {_method(current)}; hotswapping supports plain LoRA "
                         f"adapters only (rsLoRA and rank / alpha patterns included), as in PEFT")
    if not swappable(config):
        raise ValueError(f"the adapter to swap in is {_method(config)}; hotswapping supports plain LoRA adapters "
                         f"only (as in PEFT); load it as a new adapter (hotswap=False, another adapter_name)")
    if current.bias != "none" or config.bias != "none":
        raise ValueError(f"hotswapping adapters with bias={config.bias!r} (loaded: {current.bias!r}) is not "
                         f"supported: they train the base model's biases; use bias='none' adapters")
    if current.lora_bias != config.lora_bias:
        raise ValueError(f"lora_bias={config.lora_bias} differs from the loaded adapter's ({current.lora_bias}); "
                         f"hotswapping cannot add or drop tensors")
    if sorted(current.modules_to_save or []) != sorted(config.modules_to_save or []):
        raise ValueError(f"modules_to_save={config.modules_to_save} differs from the loaded adapter's "
                         f"({current.modules_to_save}); hotswapping cannot add or drop module copies")
    merged = [name for name, layer in adapter_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights ({merged[0]}, ...); call "
                         f"unmerge_adapter(model) before swapping (a swap would corrupt the merged weights)")
    _refuse_partitioned(model)
    return current


@dataclass
class Held:
    """What one slot takes from the swapped-in adapter: its rank, alpha, scaling and this rank's
    shard of each tensor (``lora_A`` [r, in_local], ``lora_B`` [out_local, r], ``lora_bias``)."""

    factors: LoraFactors
    r: int
    alpha: float
    scaling: float
    tensors: dict[str, torch.Tensor]


@dataclass
class Swap:
    """A validated swap: slots that take new values, slots left vacant, module copies to fill."""

    held: list[Held] = field(default_factory=list)
    vacant: list[LoraFactors] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (parameter, local value)


def check_rank(held: Held, hf_name: str, adapter_name: str) -> None:
    """A slot's new rank must fit the tensors it goes into."""
    if held.r > held.factors.capacity:
        raise ValueError(f"{hf_name}: the adapter to swap in has rank {held.r}, above {held.factors.capacity}, the "
                         f"rank adapter {adapter_name!r} holds there; call enable_hotswap(model, target_rank="
                         f"{held.r}) (or higher) before loading the first adapter")


@torch.no_grad()
def apply_swap(model: nn.Module, adapter_name: str, config: LoraConfig, swap: Swap) -> None:
    """Write a validated :class:`Swap` into place (no allocation of parameters, no communication)
    and record ``config`` as the adapter's config."""
    for h in swap.held:
        f = h.factors
        _zero(f)
        f.r, f.alpha = h.r, h.alpha
        f.set_scaling(h.scaling)
        for role, tensor in h.tensors.items():
            f.held(role).copy_(tensor)
    for f in swap.vacant:
        _zero(f)
        f.r = 0
        f.set_scaling(0.0)
    for param, value in swap.copies:
        param.copy_(value)
    for f in [h.factors for h in swap.held] + swap.vacant:
        current = f.dropout.p if isinstance(f.dropout, nn.Dropout) else 0.0
        if current != config.lora_dropout:  # a new module (no parameters); keep dropout equal to avoid recompiling
            f.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
            f.dropout.train(f.training)  # in the mode of the factors it belongs to
    registry(model).configs[adapter_name] = config


def _zero(f: LoraFactors) -> None:
    for role in f.layouts():
        getattr(f, role).zero_()
