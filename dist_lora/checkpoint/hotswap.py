"""Planning a hotswap from a PEFT directory or a sharded checkpoint (``hotswap=True`` of
``import_peft`` / ``load_adapter``); the swap itself is :func:`dist_lora.adapters.hotswap.apply_swap`.

The swapped-in adapter is read exactly as loading it fresh would read it: its config selects the
targets (PEFT's matching rules) and gives each its rank and alpha (``rank_pattern`` /
``alpha_pattern``, rsLoRA), every selected target's tensors must be present with the shapes of
this model, and every tensor must be used. On top, every selected target must already carry the
loaded adapter with at least that rank; targets of the loaded adapter that the new one does not
select become vacant. Everything is validated on every rank (each for its own pipeline stage and
tensor shard, together through ``on_every_rank``) before anything is written.

Two sources give a slot's tensors as this rank's shards: :class:`PeftTensors` (whole PEFT-keyed
tensors, cut like the parameter) and :class:`CheckpointTensors` (a sharded checkpoint, reading
only this rank's slices).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adapters.hotswap import Held, Swap, apply_swap, check_rank, check_swappable, unwrap_compiled
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, saved_modules
from dist_lora.adapters.targets import rank_and_alpha, select
from dist_lora.checkpoint.entries import is_training_state
from dist_lora.checkpoint.peft_names import PREFIX, join_fused, peft_key
from dist_lora.config.lora import LoraConfig
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import all_gather_object


def _global_shapes(layer: AdapterLayer, factors: LoraFactors, r: int) -> dict[str, tuple[int, ...]]:
    """Global shape of each tensor of ``factors``' slot at rank ``r``."""
    out = {"lora_A": (r, layer.shard.in_features), "lora_B": (factors.slot.out_features, r)}
    if factors.lora_bias is not None:
        out["lora_bias"] = (factors.slot.out_features,)
    return out


class PeftTensors:
    """A PEFT adapter's tensors (``base_model.model.<module>.lora_A.weight``, ...), whole."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec, source: str):
        self.tensors, self.spec, self.source, self.used = tensors, spec, source, set()

    def factor(self, layer: AdapterLayer, factors: LoraFactors, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        slot = factors.slot
        kind = "embedding" if layer.shard.kind == "embedding" else "linear"
        keys = [peft_key(hf, kind, role) for hf in slot.hf_names]
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise KeyError(f"{self.source} lacks {missing[0]}, which its config targets")
        self.used.update(keys)
        full = join_fused(slot.fused, {hf: self.tensors[k] for hf, k in zip(slot.hf_names, keys)}, slot.hf_names,
                          self.spec, shared=role == "lora_A")
        if tuple(full.shape) != shape:
            raise ValueError(f"{keys[0]} has shape {tuple(full.shape)}, this model needs {shape} (an adapter of another "
                             f"base model?)")
        return factors.layouts()[role].local(full, layer.shard.tp, layer.shard.rank)

    def saved(self, module, param: torch.Tensor) -> torch.Tensor:
        key = f"{PREFIX}{module.hf_name}.weight"
        if key not in self.tensors:
            raise KeyError(f"{self.source} lacks {key} (modules_to_save)")
        self.used.add(key)
        local = module.layout.local(self.tensors[key], module.shard.tp, module.shard.rank)
        if local.shape != param.shape:
            raise ValueError(f"{key} does not fit this model's {module.hf_name} (an adapter of another base model?)")
        return local

    def unused(self, used: set[str]) -> list[str]:
        # PEFT stores base embedding / lm_head weights next to adapters that target them.
        return sorted(k for k in self.tensors if k not in used and not k.endswith(".base_layer.weight"))


class CheckpointTensors:
    """A dist_lora sharded checkpoint (``manifest`` and a ``ShardReader`` over its files)."""

    def __init__(self, manifest: dict, reader, source: str):
        self.manifest, self.reader, self.source, self.used = manifest, reader, source, set()

    def _read(self, key: str, shape: tuple[int, ...], layout, shard) -> torch.Tensor:
        meta = self.manifest["tensors"].get(key)
        if meta is None:
            raise KeyError(f"{self.source} lacks {key}, which its config targets")
        if tuple(meta["shape"]) != tuple(shape):
            raise ValueError(f"{key} has shape {tuple(meta['shape'])} in {self.source}, this model needs "
                             f"{tuple(shape)} (a checkpoint of another base model?)")
        self.used.add(key)
        local = layout.local(torch.empty(shape, device="meta"), shard.tp, shard.rank).shape
        return self.reader.local_shard(key, shard.tp, shard.rank, tuple(local))

    def factor(self, layer: AdapterLayer, factors: LoraFactors, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = f"{layer.global_name}.{factors.slot.key}.{role}"
        return self._read(key, shape, factors.layouts()[role], layer.shard)

    def saved(self, module, param: torch.Tensor) -> torch.Tensor:
        layout = module.layout
        rows = layout.size if layout.size is not None else param.shape[0] * (module.shard.tp if layout.dim == 0 else 1)
        return self._read(f"{module.global_name}.modules_to_save", (rows, *param.shape[1:]), layout, module.shard)

    def unused(self, used: set[str]) -> list[str]:
        return sorted(k for k, m in self.manifest["tensors"].items() if k not in used and not is_training_state(m["role"]))


def plan_swap(model: nn.Module, config: LoraConfig, source, adapter_name: str) -> Swap:
    """Validate swapping ``source`` (config ``config``) into ``adapter_name`` on this rank; no writes."""
    check_swappable(model, adapter_name, config)
    slots = {(path, key): (layer, f) for path, layer in adapter_layers(model)
             for key, f in layer.factors_of(adapter_name).items()}
    chosen = select(model, config)
    new = sorted(c.hf_name for c in chosen if (c.module_path, c.slot.key) not in slots)
    if new:
        raise ValueError(f"the adapter to swap in targets {', '.join(new[:4])}{' ...' if len(new) > 4 else ''}, which "
                         f"adapter {adapter_name!r} does not; hotswapping cannot add target modules (a compiled model "
                         f"would recompile): load the adapter that targets the most modules first, or load this one "
                         f"as a new adapter (hotswap=False)")
    swap = Swap()
    for c in chosen:
        layer, factors = slots[(c.module_path, c.slot.key)]
        r, alpha = rank_and_alpha(config, c)
        held = Held(factors, r, alpha, config.scaling_for(r, alpha), {})
        check_rank(held, c.hf_name, adapter_name)
        shapes = _global_shapes(layer, factors, r)
        held.tensors = {role: source.factor(layer, factors, role, shapes[role]) for role in factors.layouts()}
        swap.held.append(held)
    taken = {(c.module_path, c.slot.key) for c in chosen}
    swap.vacant = [f for key, (_, f) in slots.items() if key not in taken]
    for _, module in saved_modules(model):
        if adapter_name in module.copies:
            param = module.copies[adapter_name]
            swap.copies.append((param, source.saved(module, param)))
    return swap


def swap_in(model: nn.Module, config: LoraConfig, source, adapter_name: str) -> None:
    """Collective: swap ``source``'s adapter into ``adapter_name`` in place, or raise on every
    rank leaving the model as it was (see module docstring)."""
    model = unwrap_compiled(model)
    what = f"hotswapping {source.source} into adapter {adapter_name!r}"
    swap = None
    with on_every_rank(what):
        swap = plan_swap(model, config, source, adapter_name)
    used = set().union(*all_gather_object(source.used))
    with on_every_rank(what):
        unused = source.unused(used)
        if unused:
            raise ValueError(f"{source.source} has tensors no target of adapter {adapter_name!r} takes: {unused[:3]} "
                             f"(an adapter of another base model, or targets its config does not name?)")
    apply_swap(model, adapter_name, config, swap)


def peft_source(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> PeftTensors:
    return PeftTensors(tensors, view(unwrap_compiled(model)).spec, source)
