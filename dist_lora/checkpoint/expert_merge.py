"""Offline merged release of an adapter on routed experts (PEFT's ``target_parameters``).

Expert ``e`` of a targeted fused parameter (``model.layers.3.mlp.experts.gate_up_proj``
[E, out, in]) gains ``s B_e A_e`` [out, in], its factors unpacked from PEFT's packed tensors
(:mod:`dist_lora.checkpoint.expert_keys`), ``s`` from the parameter's rank / alpha. The base may
be in either checkpoint format of the family (:mod:`dist_lora.models.families`): transformers'
fused [E, ...] tensors get every expert's delta stacked; the per-expert format (Mixtral's
``experts.{e}.w1 / w3 / w2``) gets the gate rows ``[:f]`` of ``gate_up_proj``'s delta on the gate
projection, the up rows ``[f:]`` on the up projection, ``down_proj``'s delta on the down
projection. Deltas are computed when their base tensor is streamed, one at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from dist_lora.adapters.targets import pattern_value
from dist_lora.checkpoint.expert_keys import ROLES, peft_expert_key, unpack


def _targeted(config, param: str) -> bool:
    return any(param == t or param.endswith(f".{t}") for t in config.target_parameters)


def expert_deltas(config, tensors: dict, spec, names: set[str]) -> tuple[dict[str, Callable[[], torch.Tensor]], set]:
    """(base tensor name -> a function giving its float32 delta, the PEFT keys used). Raises
    ``ValueError`` for a dense base, a missing factor or an adapter for another expert count."""
    if not config.target_parameters:
        return {}, set()
    if spec.experts is None:
        raise ValueError(f"the adapter adapts routed experts (target_parameters={config.target_parameters}), but "
                         f"the base is a dense {spec.family.name} model")
    deltas, used, ffn = {}, set(), spec.experts.ffn_hidden_size
    for entry in spec.family.weights:
        if not entry.per_expert:
            continue
        for g in range(spec.num_layers):
            param = entry.fused[0][0].format(layer=g)
            if not _targeted(config, param):
                continue
            r = pattern_value(config.rank_pattern, param, config.r)
            scaling = config.scaling_for(r, pattern_value(config.alpha_pattern, param, config.lora_alpha))
            factors = {}
            for role in ROLES:
                key = peft_expert_key(param, role, config.target_parameters, spec)
                if key not in tensors:
                    raise ValueError(f"the adapter's target_parameters name {param} but it has no {key}")
                factors[role] = unpack(role, tensors[key], spec.experts.num_experts, r, key)
                used.add(key)

            def delta(e: int, a=factors["lora_A"], b=factors["lora_B"], s=scaling) -> torch.Tensor:
                return s * (b[e].float() @ a[e].float())

            if param in names:  # transformers' fused format: [E, out, in]
                deltas[param] = lambda d=delta: torch.stack([d(e) for e in range(spec.experts.num_experts)])
                continue
            for e in range(spec.experts.num_experts):
                hf = [n.format(layer=g, expert=e) for n in entry.hf]
                missing = [n for n in hf if n not in names]
                if missing:
                    raise ValueError(f"the base has neither {param} nor {missing[0]}: not a checkpoint of this "
                                     f"{spec.family.name} model")
                if len(hf) == 2:  # [gate; up] rows of gate_up_proj's delta
                    deltas[hf[0]] = lambda d=delta, e=e: d(e)[:ffn]
                    deltas[hf[1]] = lambda d=delta, e=e: d(e)[ffn:]
                else:
                    deltas[hf[0]] = lambda d=delta, e=e: d(e)
    return deltas, used
