"""PEFT's format for LoRA on routed experts (``target_parameters``), both ways.

PEFT 0.21 wraps each targeted 3D expert parameter [E, out, in] in a ``ParamWrapper`` whose
``lora_A`` is one ``nn.Linear(in, r * E)`` and ``lora_B`` one ``nn.Linear(r * E, out)``:

* ``lora_A.weight`` [r * E, in]: expert ``e``'s A [r, in] is rows ``e * r : (e + 1) * r``;
* ``lora_B.weight`` [out, r * E]: expert ``e``'s B [out, r] is columns ``e, e + E, e + 2E, ...``
  (``reshape(out, r, E)[:, :, e]``), so the two factors are packed differently;
* the delta of expert ``e`` is ``scaling * B_e @ A_e`` with ``scaling = alpha / r`` (or
  ``alpha / sqrt(r)``), r the per-expert rank (``rank_pattern`` keys name the parameter,
  ``model.layers.3.mlp.experts.down_proj``).

Several targeted parameters of one module nest their wrappers: PEFT wraps them in the order
the module declares them (``gate_up_proj`` before ``down_proj``), each around the previous one,
so the first one's tensors sit one ``base_layer.`` deeper per parameter wrapped after it:
``...mlp.experts.base_layer.lora_A.weight`` (gate_up_proj) and ``...mlp.experts.lora_A.weight``
(down_proj) when both are targeted.
"""

from __future__ import annotations

import re

import torch

from dist_lora.adapters.targets import pattern_value
from dist_lora.checkpoint.peft_names import PREFIX

ROLES = ("lora_A", "lora_B")


def declared_parameters(spec) -> list[str]:
    """The expert module's parameter names in declaration order (``gate_up_proj``, ``down_proj``)."""
    names = []
    for entry in spec.family.weights:
        if entry.per_expert:
            names.append(entry.fused[0][0].rsplit(".", 1)[1])
    return names


def _targeted(targets: list[str], name: str) -> bool:
    return any(name == t or name.endswith(f".{t}") for t in targets)


def peft_expert_key(param_name: str, role: str, targets: list[str], spec) -> str:
    """PEFT's key of ``role`` (``lora_A`` / ``lora_B``) of the adapter on the fused expert
    parameter ``param_name`` (``model.layers.3.mlp.experts.gate_up_proj``), for an adapter whose
    ``target_parameters`` are ``targets``."""
    module, _, param = param_name.rpartition(".")
    order = declared_parameters(spec)
    later = order[order.index(param) + 1:]
    depth = sum(_targeted(targets, f"{module}.{other}") for other in later)
    return f"{PREFIX}{module}." + "base_layer." * depth + f"{role}.weight"


def pack(role: str, per_expert: list[torch.Tensor]) -> torch.Tensor:
    """PEFT's packed tensor from every expert's factor (A [r, in] or B [out, r]), in expert order."""
    if role == "lora_A":
        return torch.cat(per_expert, dim=0)
    stacked = torch.stack(per_expert)  # [E, out, r]
    return stacked.permute(1, 2, 0).reshape(stacked.shape[1], -1)  # column j * E + e = B_e[:, j]


def unpack(role: str, packed: torch.Tensor, experts: int, r: int, key: str) -> list[torch.Tensor]:
    """Every expert's factor from PEFT's packed tensor; a tensor for another expert count or rank
    raises ``ValueError`` naming it."""
    dim = 0 if role == "lora_A" else 1
    if packed.dim() != 2 or packed.shape[dim] != r * experts:
        held = packed.shape[dim] if packed.dim() == 2 else tuple(packed.shape)
        found = f" (r={r} x {held // r} experts)" if packed.dim() == 2 and held % r == 0 else ""
        raise ValueError(f"{key} packs {held} rows of {role}{found}, but this model's adapter needs r={r} x "
                         f"{experts} experts = {r * experts}: an adapter for a model with another expert count "
                         f"(or rank)")
    if role == "lora_A":
        return list(packed.reshape(experts, r, -1).unbind(0))
    return list(packed.reshape(packed.shape[0], r, experts).permute(2, 0, 1).unbind(0))


_EXPERT_KEY = re.compile(r"(?:\.base_layer)*\.lora_[AB]\.weight$")


def is_expert_key(key: str, spec) -> bool:
    """Whether a PEFT key belongs to an adapter on routed experts (``...mlp.experts[.base_layer]*.lora_X.weight``)."""
    if spec is None or spec.experts is None:
        return False
    stem = _EXPERT_KEY.sub("", key)
    return stem.endswith(".mlp.experts")


def expert_parameter_names(spec) -> list[str]:
    """Every layer's fused expert parameters (``model.layers.3.mlp.experts.gate_up_proj``, ...)."""
    names = []
    for entry in spec.family.weights:
        if entry.per_expert:
            names += [entry.fused[0][0].format(layer=g) for g in range(spec.num_layers)]
    return names


def check_expert_shapes(config, tensors: dict, spec) -> None:
    """Raise ``ValueError`` if a PEFT adapter's packed expert tensors do not fit this model's
    experts (another expert count or rank): checked before the adapter is added."""
    if spec is None or spec.experts is None or not config.target_parameters:
        return
    for param in expert_parameter_names(spec):
        r = pattern_value(config.rank_pattern, param, config.r)
        for role in ROLES:
            key = peft_expert_key(param, role, config.target_parameters, spec)
            if key in tensors:
                unpack(role, tensors[key], spec.experts.num_experts, r, key)
