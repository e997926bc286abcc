"""The adaptable outputs of a model (*candidates*) and the names each one answers to.

A candidate is one adaptable output: a whole layer, or one projection (q, k, v, gate, up)
inside a fused Megatron layer. Its names are what ``target_modules`` / ``exclude_modules`` are
matched against:

* on a dist_lora Megatron model, the Hugging Face module name (``model.layers.3.self_attn.q_proj``)
  and, for whole layers, the Megatron name with the *global* layer index
  (``decoder.layers.3.self_attention.linear_qkv``; ``embedding`` also names the word embeddings);
* on any other model (a Hugging Face model under DeepSpeed), its own module name.

A routed expert's ``linear_fc1`` / ``linear_fc2`` (kind ``expert``) answers to the name of the
fused parameter PEFT's ``target_parameters`` targets (``model.layers.3.mlp.experts.gate_up_proj``
/ ``down_proj``); its Megatron name carries the global expert index
(``decoder.layers.3.mlp.experts.5.linear_fc1``) and identifies it in checkpoints.

Which of the two enumerations applies is decided by :mod:`dist_lora.adapters.model`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dist_lora.layers.sharding import REPLICATED, FactorLayout
from dist_lora.layers.slots import WHOLE, Slot
from dist_lora.layers.wrapper import BaseWrapper
from dist_lora.models.fused import projection_blocks
from dist_lora.models.loading import ModelInfo

_FUSED_LAYOUTS = ("qkv", "glu")


@dataclass(frozen=True)
class Candidate:
    module_path: str  # attribute path in the model (local layer index under PP)
    names: tuple[str, ...]  # names target_modules / exclude_modules are matched against
    hf_name: str  # the HF name used for layers_to_transform and rank / alpha patterns
    slot: Slot
    kind: str  # "linear" | "output" | "embedding" | "expert"
    group: str  # candidates that share a base layer and cannot be fused + canonical at once
    expert: int | None = None  # a routed expert's global index

    @property
    def global_name(self) -> str:
        """Layout-independent name of the base layer (Megatron name, global layer index)."""
        return self.names[1] if len(self.names) > 1 else self.names[0]


def megatron_candidates(model: nn.Module, info: ModelInfo) -> list[Candidate]:
    """Candidates of this rank's part of a dist_lora Megatron model (its pipeline stage)."""
    spec, groups = info.spec, info.groups
    layers = spec.layers_of_stage(groups.pp_rank, groups.pp_size)
    modules = dict(model.named_modules())
    out = []
    for entry in spec.family.weights:
        if not entry.megatron.endswith(".weight") or entry.layout == "replicated":
            continue
        if entry.when is not None and entry.when not in spec.features:
            continue
        if entry.per_expert:
            out += _expert_candidates(entry, spec, groups, layers, modules)
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
                blocks = projection_blocks(entry.layout, spec, groups.tp_size)
                total = 0
                for i, name in enumerate(hf):
                    n_rows = blocks[i].groups * blocks[i].width * groups.tp_size
                    total += n_rows
                    slot = Slot(name.rsplit(".", 1)[1], (name,), n_rows, FactorLayout(dim=0), blocks[i])
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


def _expert_candidates(entry, spec, groups, layers, modules) -> list[Candidate]:
    """One candidate per local expert and layer: the expert's whole ``linear_fc1`` (``[gate; up]``
    rows, stride 2 over ETP) or ``linear_fc2`` (its output replicated over ETP)."""
    out = []
    experts = spec.experts.local_experts(groups.ep_size, groups.ep_rank)
    glu = entry.layout in ("glu", "gate_up")
    rows = 2 * spec.experts.ffn_hidden_size if glu else spec.hidden_size
    b_layout = FactorLayout(dim=0, stride=2) if glu else REPLICATED
    for g in layers:
        (fused,), _ = entry.fused
        param = fused.format(layer=g)  # the name target_parameters matches: ...mlp.experts.gate_up_proj
        for e in experts:
            local = entry.megatron[: -len(".weight")].format(layer=g - layers.start, expert=e - experts.start)
            if local not in modules:
                continue
            megatron_name = entry.megatron[: -len(".weight")].replace("local_experts.{expert}", "{expert}")
            slot = Slot(WHOLE, (param,), rows, b_layout)
            out.append(Candidate(local, (param, megatron_name.format(layer=g, expert=e)), param, slot, "expert",
                                 local, e))
    return out


def plain_candidates(model: nn.Module) -> list[Candidate]:
    """Candidates of a plain ``torch.nn`` / Hugging Face model: its linear and embedding layers."""
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
