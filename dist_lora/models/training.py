"""Loss and gradients of a dist_lora Megatron model, for any TP / SP / PP / DP layout.

``cross_entropy`` works on vocab-parallel logits [.., V/p] without gathering them: the max,
the sum of exponentials and the target logit are reduced over TP with differentiable
collectives, and the padding rows of the vocabulary are masked to -inf so they never count.
``forward_backward`` runs micro-batches (through Megatron's pipeline schedule when PP > 1) and
returns the loss on every rank; ``finalize_grads`` averages gradients over data-parallel ranks
and sums the partial gradients of sequence-parallel parameters over TP. Mixture-of-experts
models can add their family's auxiliary load-balancing loss (:mod:`dist_lora.models.router_loss`).
"""

from __future__ import annotations

import dataclasses

import torch

from dist_lora.adapters.registry import adapter_layers, saved_modules
from dist_lora.integrations.megatron import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    get_forward_backward_func,
)
from dist_lora.integrations.megatron_cpu import cpu_device_mode
from dist_lora.models.loading import model_info
from dist_lora.models.router_loss import RouterStatistics
from dist_lora.parallel.collectives import all_reduce_, broadcast_, reduce_from_group

IGNORE_INDEX = -100


def cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp_group, tp_rank: int) -> torch.Tensor:
    """Per-token loss [..] of vocab-parallel logits [.., V'/p] (rank ``tp_rank``'s slice)."""
    logits = local_logits.float()
    width = logits.shape[-1]
    start = tp_rank * width
    columns = torch.arange(start, start + width, device=logits.device)
    logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
    peak = logits.detach().max(dim=-1, keepdim=True).values
    all_reduce_(peak, tp_group, "max")
    shifted = logits - peak
    sum_exp = reduce_from_group(shifted.exp().sum(dim=-1), tp_group)
    local_target = labels - start
    mine = (local_target >= 0) & (local_target < width)
    picked = shifted.gather(-1, local_target.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = reduce_from_group(picked.masked_fill(~mine, 0.0), tp_group)
    loss = sum_exp.log() - target_logit
    return loss.masked_fill(labels == IGNORE_INDEX, 0.0)


def _mean_loss(local_logits, labels, spec, groups) -> torch.Tensor:
    per_token = cross_entropy(local_logits, labels, spec.vocab_size, groups.tp_group, groups.tp_rank)
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return per_token.sum() / count


def _aux_coefficient(spec, groups, router_aux_loss: bool | None) -> float | None:
    """The auxiliary loss's coefficient when it is on, else ``None``."""
    experts = spec.experts
    on = (experts is not None and experts.aux_loss) if router_aux_loss is None else router_aux_loss
    if not on:
        return None
    if experts is None:
        raise ValueError(f"router_aux_loss=True needs a mixture-of-experts model; {spec.family.name} has no router")
    if groups.pp_size > 1:
        raise ValueError("router_aux_loss is not supported with pipeline_parallel > 1: the family's loss pools the "
                         "routing statistics of every layer, which live on different stages; use "
                         "pipeline_parallel=1 or train without it (router_aux_loss=False)")
    return experts.aux_loss_coef


def _micro_batch_loss(model, ids, positions, labels, spec, groups, coefficient: float | None) -> torch.Tensor:
    """One micro-batch's mean token loss (plus ``coefficient`` times the auxiliary loss) at PP = 1."""
    if coefficient is None:
        return _mean_loss(model(ids, positions, attention_mask=None), labels, spec, groups)
    with RouterStatistics(model, spec.experts.num_experts, groups.tp_group) as routing:
        out = model(ids, positions, attention_mask=None)
    return _mean_loss(out, labels, spec, groups) + coefficient * routing.loss()


def forward_backward(model, input_ids: torch.Tensor, labels: torch.Tensor, num_microbatches: int = 1,
                     forward_only: bool = False, router_aux_loss: bool | None = None) -> torch.Tensor:
    """Mean token loss of the batch (mean over micro-batches of their token means), on every
    rank; gradients are accumulated into ``.grad`` unless ``forward_only``.

    ``input_ids`` and ``labels`` are [batch, seq] (labels already shifted; -100 is ignored);
    the batch splits into ``num_microbatches`` equal micro-batches along dim 0.
    ``router_aux_loss`` (mixture-of-experts models): add ``router_aux_loss_coef`` times the
    family's load-balancing loss of each micro-batch, as transformers does with
    ``output_router_logits=True``; ``None`` follows the model's ``config.json``
    (``output_router_logits``). Not with pipeline parallelism.
    """
    info = model_info(model)
    groups, spec = info.groups, info.spec
    batch, seq = input_ids.shape
    if batch % num_microbatches:
        raise ValueError(f"batch size {batch} does not split into {num_microbatches} micro-batches")
    if groups.sequence_parallel and seq % groups.tp_size:
        raise ValueError(f"sequence length {seq} must be divisible by the TP size {groups.tp_size} with SP")
    coefficient = _aux_coefficient(spec, groups, router_aux_loss)
    ids_mb, labels_mb = input_ids.chunk(num_microbatches), labels.chunk(num_microbatches)
    positions = torch.arange(seq).unsqueeze(0).expand(batch // num_microbatches, -1)
    if groups.pp_size == 1:
        total = torch.zeros(())
        for ids, lab in zip(ids_mb, labels_mb):
            loss = _micro_batch_loss(model, ids, positions, lab, spec, groups, coefficient) / num_microbatches
            if not forward_only:
                loss.backward()
            total += loss.detach()
        return total
    batches = iter(zip(ids_mb, labels_mb))
    losses = []

    def forward_step(_iterator, chunk):
        ids, lab = next(batches)
        out = chunk(ids, positions, attention_mask=None)

        def loss_func(output):
            loss = _mean_loss(output, lab, spec, groups)
            losses.append(loss.detach().clone())  # the schedule divides the returned tensor in place
            return loss, {"loss": loss.detach()}

        return out, loss_func

    with cpu_device_mode():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None] * num_microbatches), model=[model],
            num_microbatches=num_microbatches, seq_length=seq, micro_batch_size=batch // num_microbatches,
            forward_only=forward_only)
    total = torch.stack(losses).mean() if losses else torch.zeros(())
    return broadcast_(total.clone(), groups.pp_size - 1, groups.pp_group)


def use_megatron_ddp(model, bucket_size: int | None = None) -> None:
    """Reduce data-parallel gradients with Megatron-Core's ``DistributedDataParallel``: backward
    hooks accumulate each trainable gradient into contiguous fp32 buckets, and
    :func:`finalize_grads` all-reduces whole buckets (a few collectives per step instead of one
    per adapter tensor). Forward and backward still call ``model`` itself.

    Call after the adapters are applied (the buckets cover the parameters trainable now; ones
    made trainable later are reduced tensor by tensor). No-op without data parallelism."""
    info = model_info(model)
    if info.groups.dp_size == 1 or info.ddp is not None:
        return
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False, bucket_size=bucket_size)
    model.dist_lora = dataclasses.replace(info, ddp=DistributedDataParallel(model.config, ddp_config, module=model))


def finalize_grads(model) -> None:
    """Average trainable gradients over data-parallel ranks (Megatron DDP's buckets when
    :func:`use_megatron_ddp` is on, else one all-reduce per tensor); sum sequence-parallel
    partial gradients (norm weights, row-parallel biases) over TP. Call after backward, before
    the step; the gradients are then in ``.grad`` (and DDP's buffers are cleared).

    A routed expert's parameters (Megatron's mark: ``allreduce = False``) saw the tokens of every
    rank that routed to it, so its gradient is already a sum over part of the dense DP group: it
    is summed over the expert's replicas (the expert-data-parallel group) and divided by the dense
    DP size, as Megatron-Core's DDP does for expert buffers."""
    info = model_info(model)
    groups, ddp = info.groups, info.ddp
    bucketed = set()
    if ddp is not None:
        ddp.finish_grad_sync()  # scales by 1/dp and all-reduces each bucket
        for param in model.parameters():
            if param.requires_grad and getattr(param, "main_grad", None) is not None:
                param.grad = param.main_grad.to(param.dtype).clone()
                bucketed.add(id(param))
        ddp.zero_grad_buffer()
    for param in model.parameters():
        if not param.requires_grad or param.grad is None:
            continue
        if groups.sequence_parallel and getattr(param, "sequence_parallel", False):
            all_reduce_(param.grad, groups.tp_group)
        if id(param) in bucketed:
            continue
        if not getattr(param, "allreduce", True):  # a routed expert's: summed over its replicas
            if groups.edp_size > 1:
                all_reduce_(param.grad, groups.edp_group)
            if groups.dp_size > 1:
                param.grad.div_(groups.dp_size)
        elif groups.dp_size > 1:
            all_reduce_(param.grad, groups.dp_group)
            param.grad.div_(groups.dp_size)


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip trainable gradients to a global L2 norm of ``max_norm``; return the norm before clipping.

    The norm is over the *global* parameters: a tensor split over TP counts every shard, a tensor
    replicated over TP (LoRA A of column layers, B of row layers, unsplit biases) counts once,
    and the squares are summed over the model-parallel group (TP x PP). Data-parallel replicas
    hold equal gradients after ``finalize_grads`` and are not summed. A routed expert's tensors
    (``allreduce = False``) are split over EP and, like a dense layer's over TP, split or
    replicated over ETP: their squares are summed over the expert-model-parallel group
    (ETP x EP x PP) instead.
    """
    groups = model_info(model).groups
    split = {id(p) for p in model.parameters() if getattr(p, "tensor_model_parallel", False)}
    for _, layer in adapter_layers(model):
        for slots in layer.lora.values():
            for factors in slots.values():
                for name, layout in factors.layouts().items():
                    (split.add if layout.dim is not None else split.discard)(id(getattr(factors, name)))
    for _, module in saved_modules(model):
        if module.layout.dim is not None:
            split.update(id(p) for p in module.copies.values())
    dense, experts, grads = torch.zeros(()), torch.zeros(()), []
    for param in model.parameters():
        if not param.requires_grad or param.grad is None:
            continue
        grads.append(param.grad)
        if getattr(param, "allreduce", True):
            if id(param) in split or groups.tp_rank == 0:
                dense += param.grad.float().pow(2).sum()
        elif id(param) in split or groups.etp_rank == 0:
            experts += param.grad.float().pow(2).sum()
    all_reduce_(dense, groups.model_parallel_group)
    if groups.expert_model_parallel_group is not None:
        all_reduce_(experts, groups.expert_model_parallel_group)
    norm = (dense + experts).sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for grad in grads:
            grad.mul_(max_norm / (norm + 1e-6))
    return norm
