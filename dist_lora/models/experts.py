"""``ExpertSpec``: the routed experts of a mixture-of-experts checkpoint, read and validated once.

Transformers 5 stores a layer's experts fused: ``mlp.experts.gate_up_proj`` [E, 2f, h] (gate rows
first, then up) and ``mlp.experts.down_proj`` [E, h, f], with the router ``mlp.gate.weight``
[E, h]. Megatron-Core builds them as an ``MoELayer``: a ``TopKRouter`` and a ``SequentialMLP`` of
E/EP local experts per expert-parallel rank, each an MLP whose ``linear_fc1`` [2f/etp, h] holds
``[gate_i; up_i]`` and whose ``linear_fc2`` [h, f/etp] holds columns ``i`` (ETP rank ``i``).

Routing, as each family defines it (every top-k weight is a softmax probability):

* Mixtral, and Qwen3-MoE with ``norm_topk_prob``: softmax over all E logits, keep the top k,
  renormalise them to sum to one, which is a softmax over the k chosen logits (Megatron's
  ``moe_router_pre_softmax=False``);
* Qwen3-MoE without ``norm_topk_prob``: the top k of the softmax over all E logits, not
  renormalised (``moe_router_pre_softmax=True``).

Everything here is computed from ``config.json`` alone (every rank reaches the same verdict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertKeys:
    """Where a family's config keeps its expert settings."""

    count: tuple[str, ...]  # number of routed experts: the first of these keys that config.json has
    ffn: str  # one expert's FFN (intermediate) size
    normalise: str | None = None  # key that switches top-k renormalisation on; None: always on


@dataclass(frozen=True)
class ExpertSpec:
    num_experts: int
    top_k: int
    ffn_hidden_size: int  # one expert's FFN size f
    renormalise: bool  # top-k weights renormalised (softmax over the k chosen logits)
    aux_loss_coef: float  # router_aux_loss_coef
    aux_loss: bool  # output_router_logits: the family adds coef * load-balancing loss to its loss

    def local_experts(self, ep_size: int, ep_rank: int) -> range:
        """Global indices of the experts on expert-parallel rank ``ep_rank``."""
        per_rank = self.num_experts // ep_size
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def check_layout(self, ep: int, etp: int, tp: int, sequence_parallel: bool) -> None:
        """Raise ``ValueError`` naming the setting an expert layout does not fit."""
        if self.num_experts % ep:
            raise ValueError(
                f"expert_parallel={ep} does not divide the number of experts ({self.num_experts}); use an "
                f"expert_parallel size that divides {self.num_experts}"
            )
        if self.ffn_hidden_size % etp:
            raise ValueError(
                f"expert_tensor_parallel={etp} does not divide the expert FFN size ({self.ffn_hidden_size}); "
                f"use an expert_tensor_parallel size that divides {self.ffn_hidden_size}"
            )
        if tp > 1 and not sequence_parallel:
            raise ValueError(
                f"a mixture-of-experts model at tensor_parallel={tp} needs sequence_parallel=True: Megatron-Core "
                f"routes each rank's sequence shard to the experts (tokens replicated over TP would be counted "
                f"{tp} times)"
            )


def expert_spec(config: dict[str, Any], keys: ExpertKeys) -> ExpertSpec:
    """The experts of an HF ``config.json`` dict; a clear error for what dist_lora cannot build."""
    count = next((k for k in keys.count if k in config), None)
    missing = [k for k in (keys.ffn, "num_experts_per_tok") if k not in config] + ([] if count else [keys.count[0]])
    if missing:
        raise ValueError(f"config.json lacks required mixture-of-experts keys: {', '.join(missing)}")
    experts, top_k = int(config[count]), int(config["num_experts_per_tok"])
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok={top_k} must lie in [1, {count}={experts}]")
    if float(config.get("router_jitter_noise") or 0.0) > 0:
        raise ValueError(
            f"router_jitter_noise={config['router_jitter_noise']} is not supported: the random jitter of the "
            f"router input in training cannot be reproduced; set router_jitter_noise=0"
        )
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
        raise ValueError(
            f"dense MLP layers between the mixture-of-experts layers (mlp_only_layers="
            f"{config.get('mlp_only_layers')}, decoder_sparse_step={config.get('decoder_sparse_step', 1)}) are "
            f"not supported; every layer must route to experts (mlp_only_layers=[], decoder_sparse_step=1)"
        )
    if config.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts (shared_expert_intermediate_size) are not supported")
    return ExpertSpec(
        num_experts=experts,
        top_k=top_k,
        ffn_hidden_size=int(config[keys.ffn]),
        renormalise=True if keys.normalise is None else bool(config.get(keys.normalise, False)),
        aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0) or 0.0),
        aux_loss=bool(config.get("output_router_logits", False)),
    )
