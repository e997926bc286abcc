"""Adapter management, named as in PEFT: switch, disable, delete, merge, unload.

Every function is called on all ranks of the job with the same arguments (they change only
local shards; ``safe_merge`` and the DoRA row norms of row-parallel layers communicate).
``merge_and_unload`` checks everything before it changes anything, and unties the head of a
tied-embedding model when the merge would make head and embedding differ
(:mod:`dist_lora.models.tied`; PEFT does so for a saved head).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from dist_lora.adapters.journal import set_module
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, drop, registry, require_adapter, saved_modules, wrappers
from dist_lora.adapters.trainable import refresh
from dist_lora.integrations.deepspeed import gathered
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.modules_to_save import ModulesToSave
from dist_lora.models.tied import is_tied, output_layer, untie_output_layer, word_embeddings
from dist_lora.parallel.agreement import any_rank, on_every_rank, raise_if_any


def active_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).active)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` (or the list, whose outputs add up) the active adapter(s); only
    active adapters are trainable."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name")
    for name in names:
        require_adapter(model, name)
    registry(model).active = names
    refresh(model)


def disable_adapters(model: nn.Module) -> None:
    registry(model).disabled = True
    refresh(model)


def enable_adapters(model: nn.Module) -> None:
    registry(model).disabled = False
    refresh(model)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Context in which the model computes with its base weights only."""
    before = registry(model).disabled
    disable_adapters(model)
    try:
        yield
    finally:
        registry(model).disabled = before
        refresh(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    require_adapter(model, adapter_name)
    reg = registry(model)
    for _, layer in list(wrappers(model)):
        if adapter_name in layer.adapter_names():
            layer.delete_adapter(adapter_name)
    del reg.configs[adapter_name]
    reg.active = [a for a in reg.active if a != adapter_name]
    if not reg.active and reg.configs:
        reg.active = [next(iter(reg.configs))]
    refresh(model)


def _names(model: nn.Module, adapter_names: list[str] | None) -> list[str]:
    names = active_adapters(model) if adapter_names is None else list(adapter_names)
    for name in names:
        require_adapter(model, name)
    return names


def merge_adapter(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the local base weight shards.

    ``safe_merge`` first computes every merged shard without writing it; if any value on any
    rank is not finite, every rank raises and no weight is changed.
    """
    names = _names(model, adapter_names)
    with on_every_rank(f"merging {names}"):
        for module_name, layer in adapter_layers(model):
            for name in names:
                if name in layer.adapter_names():
                    try:
                        layer.check_mergeable(name)
                    except RuntimeError as err:
                        raise RuntimeError(f"{module_name}: {err}") from err
    if safe_merge:
        bad = None
        for module_name, layer in adapter_layers(model):
            for name in names:
                if name in layer.adapter_names() and name not in layer.merged_adapters:
                    with gathered(layer.parameters()):
                        candidates = layer.merge_candidates(name)
                    for factors, merged, _ in candidates:
                        if not torch.isfinite(merged).all() and bad is None:
                            bad = ValueError(f"merging adapter {name!r} into {module_name} gives non-finite "
                                             f"weights; the adapter is broken")
        raise_if_any(bad, what="safe merge")
    for _, layer in adapter_layers(model):
        for name in names:
            if name in layer.adapter_names():
                with gathered(layer.parameters(), modify=True):  # ZeRO-3: this layer's full weights
                    layer.merge(name)


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in adapter_layers(model):
        for name in list(reversed(layer.merged_adapters)):
            with gathered(layer.parameters(), modify=True):
                layer.unmerge(name)


def _unties(model: nn.Module, names: list[str], chosen: dict[int, str | None]) -> bool:
    """Collective: whether merging ``names`` (and the chosen saved copies) into a tied-embedding
    Megatron model makes its head differ from its embedding on any rank: a saved head, or an
    adapter merged into the head or into the embedding (the head never saw it in training)."""
    if not view(model).megatron or not is_tied(model):
        return False
    head = output_layer(model)
    merged = [m for m in (head, word_embeddings(model))
              if isinstance(m, AdapterLayer) and any(n in m.adapter_names() for n in names)]
    saved = isinstance(head, ModulesToSave) and chosen.get(id(head)) is not None
    return any_rank(bool(merged) or saved)


def _is_shared(model: nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a parameter of more than one module (a tied Hugging Face lm_head)."""
    return sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _write_saved_copy(model: nn.Module, module: ModulesToSave, copy: torch.Tensor) -> None:
    """The merged model's weight of a ``modules_to_save`` module: its trained copy. A weight
    tied to another module (a Hugging Face lm_head tied to the embedding) is untied, as PEFT
    does: the module gets the copy as its own weight, the other keeps its values, and the
    config's ``tie_word_embeddings`` becomes False."""
    base = module.base_layer
    with gathered([base.weight, copy], modify=True):
        if not _is_shared(model, base.weight):
            base.weight.data.copy_(copy.data)
            return
        base.weight = nn.Parameter(copy.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _unwrap(model: nn.Module, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
    """Everything that can refuse (merge checks, safe_merge) runs before anything changes; a tied
    Megatron head that the merge changes is untied first, and tied again on refusal."""
    active = registry(model).active
    chosen = {id(m): next((a for a in active if a in m.copies), None) for _, m in saved_modules(model)}
    if merge:
        names = _names(model, adapter_names)
        retie = untie_output_layer(model) if _unties(model, names, chosen) else None
        try:
            merge_adapter(model, names, safe_merge)
        except BaseException:
            if retie is not None:
                retie()
            raise
    for name, layer in list(adapter_layers(model)):
        set_module(model, name, layer.base_layer)
    for name, module in list(saved_modules(model)):
        if merge and chosen[id(module)] is not None:
            _write_saved_copy(model, module, module.copies[chosen[id(module)]])
        set_module(model, name, module.base_layer)
    drop(model)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge the active (or given) adapters and return the model with plain base layers."""
    return _unwrap(model, True, safe_merge, adapter_names)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; the base model comes back unchanged."""
    unmerge_adapter(model)
    return _unwrap(model, False, False, None)
