"""AdaLoRA's orthogonality penalty on P and Q, as PEFT's ``AdaLoraModel.forward`` adds it to the loss.

``R = orth_reg_weight * mean over every lora_A and lora_B tensor of ||G - I||_F`` with
``G = Q Q^T`` [r, r] for ``lora_A`` and ``G = P^T P`` [r, r] for ``lora_B``.

Under TP a sharded factor's Gram matrix is a sum over the TP group: ``Q Q^T = sum_i Q_i Q_i^T``
for row layers (Q split on ``in``), ``P^T P = sum_i P_i^T P_i`` for column layers (P split on
``out``). The partial Grams go through ``reduce_from_group`` (all-reduce forward, identity
backward): the penalty is the same on every TP rank, so each rank's gradient with respect to its
shard ``(dG + dG^T) Q_i`` is exact. Replicated factors (Q of column layers, P of row layers) get
the whole penalty gradient on every rank, while ``finalize_grads`` sums their gradients over TP
(the model's part is a partial sum there): they enter through ``count_once``, so the penalty's
part is counted on one rank. Under PP each stage
sums its own tensors and the sums are all-reduced over the pipeline group (identity backward:
each stage's gradient reaches only its own factors). Data-parallel replicas compute the same
value and gradient, which ``finalize_grads`` leaves unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adalora.layers import adalora_config, pp_group, svd_factors
from dist_lora.parallel.collectives import all_reduce_, count_once, reduce_from_group
from dist_lora.parallel.device import module_device


def _gram_distance(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.norm(gram - eye, p="fro")


def orth_reg_loss(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """The weighted penalty (a differentiable scalar, equal on every rank); add it to the loss,
    or call ``.backward()`` on it after the model's backward, once per optimizer step, before
    ``finalize_grads``."""
    config = adalora_config(model, adapter_name)
    terms = []
    for _, layer, factors in svd_factors(model, adapter_name):
        shard = layer.shard
        q, p = factors.lora_A, factors.lora_B
        if shard.tp > 1 and factors.a_layout.dim is None:
            q = count_once(q, shard.tp_group)
        if shard.tp > 1 and factors.slot.b_layout.dim is None:
            p = count_once(p, shard.tp_group)
        q_gram, p_gram = q @ q.T, p.T @ p
        if shard.tp > 1 and factors.a_layout.dim is not None:
            q_gram = reduce_from_group(q_gram, shard.tp_group)
        if shard.tp > 1 and factors.slot.b_layout.dim is not None:
            p_gram = reduce_from_group(p_gram, shard.tp_group)
        terms += [_gram_distance(q_gram), _gram_distance(p_gram)]
    device = module_device(model)  # a stage without AdaLoRA layers still joins the PP reduction
    total = torch.stack(terms).sum() if terms else torch.zeros((), device=device)
    count = torch.tensor([float(len(terms))], device=device)
    group = pp_group(model)
    if group is not None:
        total = reduce_from_group(total, group)
        all_reduce_(count, group)
    if count.item() == 0:
        return total * 0.0
    return config.orth_reg_weight * total / count.item()
