"""``add_weighted_adapter``: a new adapter combined from existing ones, computed on the shards.

Semantics are PEFT's ``LoraModel.add_weighted_adapter`` (its LoRA reference), slot by slot
(a slot is one PEFT module: a layer, or one projection of a fused Megatron layer):

* ``cat``: ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1, ...]``; rank = sum of the ranks.
* ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: the merge of
  :mod:`.task_arithmetic` on the A's with weights ``sign(w s) sqrt|w s|`` and on the B's with
  ``sqrt|w s|`` (equal ranks needed).
* ``svd`` and ``<merge>_svd``: the merge of the delta weights ``s_i B_i A_i`` with weights
  ``w_i``, then its leading ``svd_rank`` singular triplets: ``B = U S``, ``A = Vh``, optionally
  clamped to ``[-t, t]`` with ``t`` the ``svd_clamp`` quantile of the values of ``U S`` and
  ``Vh`` together (a global quantile over the shards).

Sharding: A and B keep their layouts (column layers: A replicated, B split on rows; row layers
and embeddings: A split on columns, B replicated). Delta weights stay local shards
(``B_i A`` or ``B A_i``); their SVD is :func:`dist_lora.parallel.linalg.svd` (one all-reduced Gram
matrix), so ``U S`` comes out split like B and ``Vh`` like A. Magnitude pruning and the clamp
quantile are exact distributed order statistics; DARE masks are drawn globally from a generator
seeded by ``seed``, the new adapter's name, the PEFT module name, the tensor and the source
adapter's position, identical on every rank and replica. Singular pairs are signed so that the
sum of cubes of each ``Vh`` row is >= 0, so the new adapter does not depend on the TP layout.

The new adapter's config is the first adapter's, with ``r = lora_alpha =`` the new rank, the
union of the target modules, no rank / alpha patterns (as PEFT) and ``init_lora_weights=True``
(PEFT copies the first adapter's init method; PiSSA-like methods would then rewrite the base).
As in PEFT, ``use_rslora`` is kept with ``lora_alpha = r``: an rsLoRA combination is scaled by
sqrt(r) (PEFT's behaviour, kept so that exported adapters match PEFT's).
It is a normal adapter: inactive until ``set_adapter``, trainable, exportable, mergeable.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from dist_lora.adapters.add import Step, add
from dist_lora.adapters.journal import Journal
from dist_lora.adapters.lora import plan_lora
from dist_lora.combine.checks import plan_combination
from dist_lora.combine.order_stats import quantile, real_part
from dist_lora.combine.task_arithmetic import Placement, merge
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel import agreement, linalg
from dist_lora.parallel import collectives as C


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, density: float | None = None,
                         majority_sign_method: str = "total", seed: int | None = None) -> nn.Module:
    """Add ``adapter_name`` combining ``adapters`` with ``weights`` (see module docstring).

    Collective over the job: call on every rank with the same arguments. Wrong input raises on
    every rank and leaves the model as it was. With one adapter the combination is ``linear``
    (as PEFT). ``seed`` (default: the seed given to ``parallel.initialize``) seeds DARE masks."""
    agreement.check_same_on_all_ranks((adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                               majority_sign_method, seed), what="add_weighted_adapter arguments")
    plan = None
    with agreement.on_every_rank(f"add_weighted_adapter {adapter_name!r}"):
        plan = plan_combination(model, list(adapters) if isinstance(adapters, (list, tuple)) else adapters,
                                weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                                majority_sign_method)

    def planner(model, config, name, job_seed):
        """LoRA's plan of the new (zero) adapter, then one step per slot that fills it in."""
        lora = plan_lora(model, config, name, job_seed)
        mask_seed = seed if seed is not None else job_seed
        lora.steps += [Step(partial(_fill, layer, slot_key, sources, plan, mask_seed, name, density,
                                    majority_sign_method, svd_clamp), layer.shard.tp_group)
                       for layer, slot_key, sources in plan.slots]
        return lora

    return add(model, plan.config, adapter_name, planner, what="add_weighted_adapter")


@torch.no_grad()
def _fill(layer, slot_key, sources, plan, seed, adapter_name, density, majority_sign_method, svd_clamp,
          journal: Journal) -> None:
    """Set the new adapter's factors on one slot (they were created zero by this call)."""
    target = layer.factors_of(adapter_name)[slot_key]
    if plan.combination_type == "cat":
        a, b = _cat(sources)
    elif plan.combination_type.endswith("svd"):
        a, b = _svd(layer, target, sources, plan, seed, adapter_name, density, majority_sign_method, svd_clamp)
    else:
        a, b = _factor_merge(layer, target, sources, plan, seed, adapter_name, density, majority_sign_method)
    target.lora_A.zero_()
    target.lora_B.zero_()
    target.lora_A[: a.shape[0]].copy_(a)
    target.lora_B[:, : b.shape[1]].copy_(b)


def _placement(layer: AdapterLayer, factors: LoraFactors, name: str) -> Placement:
    shard = layer.shard
    shape = factors.global_shapes(shard)[name] if name != "delta" else \
        (factors.slot.out_features, shard.in_features)
    layout = factors.layouts()[name] if name != "delta" else _delta_layout(factors)
    return Placement(layout, shape, shard.tp_group, shard.tp, shard.rank)


def _delta_layout(factors: LoraFactors):
    """A delta weight ``B A`` [out, in] is split like whichever factor is split (at most one)."""
    return factors.slot.b_layout if factors.slot.b_layout.dim is not None else factors.a_layout


def _mask_names(adapter_name: str, factors: LoraFactors, tensor: str, sources) -> list[tuple[str, ...]]:
    module = factors.slot.hf_names[0]
    return [(adapter_name, module, tensor, str(position)) for position, _, _ in sources]


def _cat(sources) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([f.lora_A * (w * f.scaling) for _, w, f in sources], dim=0)
    b = torch.cat([f.lora_B for _, _, f in sources], dim=1)
    return a, b


def _factor_merge(layer, target, sources, plan, seed, adapter_name, density, majority_sign_method):
    scaled = [w * f.scaling for _, w, f in sources]
    weights_a = [math.copysign(math.sqrt(abs(x)), 1.0 if x >= 0 else -1.0) for x in scaled]
    weights_b = [math.sqrt(abs(x)) for x in scaled]
    out = []
    for name, weights in (("lora_A", weights_a), ("lora_B", weights_b)):
        tensors = [getattr(f, name) for _, _, f in sources]
        out.append(merge(tensors, weights, plan.combination_type, density, majority_sign_method,
                         _placement(layer, target, name), seed, _mask_names(adapter_name, target, name, sources)))
    return out[0].to(target.lora_A.dtype), out[1].to(target.lora_B.dtype)


def _svd(layer, target, sources, plan, seed, adapter_name, density, majority_sign_method, svd_clamp):
    how = plan.combination_type.removesuffix("_svd")
    how = "linear" if how == "svd" else how
    where = _placement(layer, target, "delta")
    deltas = [f.delta_weight() for _, _, f in sources]
    delta = merge(deltas, [w for _, w, _ in sources], how, density, majority_sign_method, where, seed,
                  _mask_names(adapter_name, target, "delta", sources))
    u, s, vh = linalg.svd(delta, where.layout.dim if where.tp > 1 else None, where.group, plan.rank)
    b, a = _layout_free_signs(layer, target, u * s, vh)
    if svd_clamp is not None:
        b, a = _clamp(layer, target, b, a, svd_clamp)
    return a.to(target.lora_A.dtype), b.to(target.lora_B.dtype)


def _layout_free_signs(layer, target, b, a):
    """Flip each singular pair so that the sum of cubes of its ``Vh`` row is >= 0: a convention
    that does not depend on how A is sharded (one all-reduce of [rank] when it is)."""
    cubes = (a.double() ** 3).sum(1)
    if target.a_layout.dim is not None and layer.shard.tp > 1:
        C.all_reduce_(cubes, layer.shard.tp_group)
    signs = torch.where(cubes < 0, -1.0, 1.0).to(a.dtype)
    return b * signs, a * signs[:, None]


def _clamp(layer, target, b, a, q):
    """Clamp ``U S`` and ``Vh`` to ``[-t, t]``, ``t`` the global ``q``-quantile of their values."""
    shard = layer.shard
    parts = []
    for tensor, layout in ((b, target.slot.b_layout), (a, target.a_layout)):
        sharded = layout.dim is not None and shard.tp > 1
        parts.append((real_part(tensor, layout, shard.tp, shard.rank).reshape(-1), sharded))
    high = quantile(parts, q, b.dtype, shard.tp_group)
    return b.clamp(-high, high), a.clamp(-high, high)
