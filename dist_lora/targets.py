"""Which modules an adapter config targets, with PEFT's matching rules.

A *candidate* is one adaptable output of the model: a whole layer, or one projection (q, k, v,
gate, up) inside a fused Megatron layer. Each candidate has the names it answers to:

* on a dist_lora Megatron model, the Hugging Face module name (``model.layers.3.self_attn.q_proj``)
  and, for whole layers, the Megatron name with the *global* layer index
  (``decoder.layers.3.self_attention.linear_qkv``; ``embedding`` also names the word embeddings);
* on any other model (a Hugging Face model under DeepSpeed), its own module name.

Matching is PEFT's ``check_target_module_exists``: a string is a regex matched against the
whole name; a list matches a name equal to an entry or ending in ``.entry``; exclusions,
``layers_to_transform`` / ``layers_pattern`` and ``rank_pattern`` / ``alpha_pattern``
(``(.*\\.)?key$``) work as in PEFT, on the Hugging Face name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from dist_lora.config import LoraConfig
from dist_lora.layers.sharding import FactorLayout, REPLICATED
from dist_lora.layers.wrapper import BaseWrapper
from dist_lora.layers.slots import WHOLE, Slot

_FUSED_LAYOUTS = ("qkv", "glu")


@dataclass(frozen=True)
class Candidate:
    module_path: str  # attribute path in the model (local layer index under PP)
    names: tuple[str, ...]  # names target_modules / exclude_modules are matched against
    hf_name: str  # the HF name used for layers_to_transform and rank / alpha patterns
    slot: Slot
    kind: str  # "linear" | "output" | "embedding"
    group: str  # candidates that share a base layer and cannot be fused + canonical at once

    @property
    def global_name(self) -> str:
        """Layout-independent name of the base layer (Megatron name, global layer index)."""
        return self.names[1] if len(self.names) > 1 else self.names[0]


def _megatron_candidates(model: nn.Module) -> list[Candidate]:
    from dist_lora.models.fused import projection_rows
    from dist_lora.models.loading import model_info

    info = model_info(model)
    spec, groups = info.spec, info.groups
    layers = spec.layers_of_stage(groups.pp_rank, groups.pp_size)
    modules = dict(model.named_modules())
    out = []
    for entry in spec.family.weights:
        if not entry.megatron.endswith(".weight") or entry.layout == "replicated":
            continue
        if entry.when is not None and entry.when not in spec.features:
            continue
        for g in (layers if entry.per_layer else [None]):
            local = entry.megatron[: -len(".weight")].format(layer=None if g is None else g - layers.start)
            if local not in modules:
                continue
            megatron_name = entry.megatron[: -len(".weight")].format(layer=g)
            hf = [n[: -len(".weight")].format(layer=g) for n in entry.hf]
            if entry.when == "tied":  # the output layer reads the embedding's weight but is lm_head
                hf = ["lm_head"]
            kind = {"vocab": "output" if local == "output_layer" else "embedding"}.get(entry.layout, "linear")
            vocab = FactorLayout(dim=0, size=spec.vocab_size, padded=spec.padded_vocab(groups.tp_size))
            if entry.layout in _FUSED_LAYOUTS:
                rows = projection_rows(entry.layout, spec, groups.tp_size)
                total = 0
                for i, name in enumerate(hf):
                    n_rows = len(rows[i]) * groups.tp_size
                    total += n_rows
                    slot = Slot(name.rsplit(".", 1)[1], (name,), n_rows, FactorLayout(dim=0), rows[i])
                    out.append(Candidate(local, (name,), name, slot, kind, local))
                stride = 2 if entry.layout == "glu" else 1
                slot = Slot(WHOLE, tuple(hf), total, FactorLayout(dim=0, stride=stride), None, entry.layout)
                out.append(Candidate(local, (megatron_name,), hf[0], slot, kind, local))
                continue
            out_features = {"row": spec.hidden_size, "column": None}.get(entry.layout)
            if kind == "embedding":
                slot = Slot(WHOLE, (hf[0],), spec.hidden_size, REPLICATED)
                names = (hf[0], megatron_name, "embedding")
            elif kind == "output":
                slot = Slot(WHOLE, (hf[0],), spec.vocab_size, vocab)
                names = (hf[0], megatron_name)
            else:
                slot = Slot(WHOLE, (hf[0],), out_features or 0, REPLICATED if entry.layout == "row" else FactorLayout(dim=0))
                names = (hf[0], megatron_name)
            out.append(Candidate(local, names, hf[0], slot, kind, local))
    return out


def _plain_candidates(model: nn.Module) -> list[Candidate]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    wrapped = {f"{n}.base_layer": m.base_layer for n, m in model.named_modules() if isinstance(m, BaseWrapper)}
    for name, module in model.named_modules():
        if name in wrapped:
            continue  # a wrapped layer is listed under the wrapper's name (the one PEFT uses)
        module = getattr(module, "base_layer", module) if isinstance(module, BaseWrapper) else module
        if isinstance(module, nn.Linear):
            kind = "output" if module is output or name.endswith("lm_head") else "linear"
            slot = Slot(WHOLE, (name,), module.out_features, FactorLayout(dim=0))
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
            slot = Slot(WHOLE, (name,), module.embedding_dim, REPLICATED)
        else:
            continue
        out.append(Candidate(name, (name,), name, slot, kind, name))
    return out


def candidates(model: nn.Module) -> list[Candidate]:
    """Every adaptable output of ``model`` (see module docstring)."""
    if hasattr(model, "dist_lora"):
        return _megatron_candidates(model)
    return _plain_candidates(model)


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


def leaf_names(model: nn.Module) -> list[str]:
    """Short names of the modules that could be targeted (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for c in candidates(model) for n in c.names})


def select(model: nn.Module, config: LoraConfig) -> list[Candidate]:
    """The candidates ``config`` targets on this rank (possibly none: under pipeline
    parallelism another stage may hold them); a ``ValueError`` names an inconsistent target."""
    pool = candidates(model)
    targets = config.target_modules
    if targets is None:
        targets = ["q_proj", "v_proj"]  # PEFT's default for the Llama / Mistral / Qwen2 families
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
    return chosen


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
