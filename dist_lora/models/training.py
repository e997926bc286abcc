"""Loss and gradients of a dist_lora Megatron model, for any TP / SP / PP / DP layout.

``cross_entropy`` works on vocab-parallel logits [.., V/p] without gathering them: the max,
the sum of exponentials and the target logit are reduced over TP with differentiable
collectives, and the padding rows of the vocabulary are masked to -inf so they never count.
``forward_backward`` runs micro-batches (through Megatron's pipeline schedule when PP > 1) and
returns the token-mean loss of the global batch on every rank; DoRA's weight norms are computed once
for all micro-batches. ``finalize_grads`` averages gradients over data-parallel ranks (a routed
expert's over its expert-data-parallel replicas) and sums over TP the gradients that are partial
sums there (sequence-parallel norm weights and biases; the replicated adapter factors whose product
joins the base layer's own collective), in buckets. Mixture-of-experts models can add their
family's auxiliary load-balancing loss (:mod:`dist_lora.models.router_loss`).
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
from dist_lora.layers.dora import held_norms
from dist_lora.models.loading import model_info
from dist_lora.models.router_loss import MicroBatchRouting, RouterLossGradients, RouterStatistics
from dist_lora.parallel.collectives import all_reduce_, all_reduce_coalesced_, broadcast_, reduce_from_group
from dist_lora.parallel.device import collective_device, module_device

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


def token_count(labels: torch.Tensor, groups) -> torch.Tensor:
    """Collective over DP: the number of labels that count (not -100) in the global batch, the
    local ``labels`` [batch, seq] summed over the data-parallel ranks (an int64 scalar)."""
    count = (labels != IGNORE_INDEX).sum().to(torch.int64)
    if groups.dp_size == 1:
        return count
    return all_reduce_(count.to(collective_device(groups.dp_group)), groups.dp_group)


def _summed_loss(local_logits, labels, spec, groups) -> torch.Tensor:
    return cross_entropy(local_logits, labels, spec.vocab_size, groups.tp_group, groups.tp_rank).sum()


def _chunks(tensor: torch.Tensor | None, n: int) -> list:
    return [None] * n if tensor is None else list(tensor.chunk(n))


def _aux_coefficient(spec, groups, router_aux_loss: bool | None) -> float | None:
    """The auxiliary loss's coefficient when it is on, else ``None``."""
    experts = spec.experts
    on = (experts is not None and experts.aux_loss) if router_aux_loss is None else router_aux_loss
    if not on:
        return None
    if experts is None:
        raise ValueError(f"router_aux_loss=True needs a mixture-of-experts model; {spec.family.name} has no router")
    return experts.aux_loss_coef


def _micro_batch_loss(model, ids, positions, mask, labels, spec, groups,
                      coefficient: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch at PP = 1: (summed token loss, ``coefficient`` times its auxiliary loss,
    zero when off)."""
    if coefficient is None:
        return (_summed_loss(model(ids, positions, attention_mask=mask), labels, spec, groups),
                torch.zeros((), device=ids.device))
    with RouterStatistics(model, spec.experts.num_experts, groups.tp_group) as routing:
        out = model(ids, positions, attention_mask=mask)
    return _summed_loss(out, labels, spec, groups), coefficient * routing.loss()


def _pipeline(model, micro: list, spec, groups, scale: float, seq: int, forward_only: bool,
              routing=None) -> list[torch.Tensor]:
    """Megatron's pipeline schedule over the micro-batches ``micro``; the summed token loss of
    each (on the last stage; empty elsewhere). ``routing.micro`` is set to each micro-batch's
    index before its forward."""
    batches = iter(enumerate(micro))
    sums = []

    def forward_step(_iterator, chunk):
        index, (ids, lab, pos, mask) = next(batches)
        if routing is not None:
            routing.micro = index
        out = chunk(ids, pos, attention_mask=mask)

        def loss_func(output):
            summed = _summed_loss(output, lab, spec, groups)
            sums.append(summed.detach().clone())
            # Megatron's schedule divides a (loss, dict) result by num_microbatches: undo it
            return summed * (scale * len(micro)), {"loss": summed.detach()}

        return out, loss_func

    batch = sum(ids.shape[0] for ids, *_ in micro)
    with cpu_device_mode():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None] * len(micro)), model=[model],
            num_microbatches=len(micro), seq_length=seq, micro_batch_size=batch // len(micro),
            forward_only=forward_only)
    return sums


def dora_slots(model) -> list:
    """(layer, factors) of every live DoRA slot of this rank's stage whose norm can be held."""
    return [(layer, factors) for _, layer in adapter_layers(model) if hasattr(layer, "held_norm_slots")
            for factors in layer.held_norm_slots()]


def forward_backward(model, input_ids: torch.Tensor, labels: torch.Tensor, num_microbatches: int = 1,
                     forward_only: bool = False, position_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, router_aux_loss: bool | None = None) -> torch.Tensor:
    """Token-mean loss of the global batch, on every rank, on the model's device; gradients of
    that mean are accumulated into ``.grad`` (or DDP's buckets) unless ``forward_only``.

    The mean is over every label that is not -100 in the whole step: all micro-batches of all
    data-parallel ranks, each token counted once however the tokens fall on micro-batches, ranks
    and pipeline stages (what a single device computes on the concatenated batch). The count is
    all-reduced over DP first; each micro-batch then back-propagates ``sum(loss) * dp / count``
    (``finalize_grads`` divides by ``dp`` when it averages over DP ranks).

    ``input_ids`` and ``labels`` are this DP rank's [batch, seq] (labels already shifted; -100 is
    ignored); the batch splits into ``num_microbatches`` equal micro-batches along dim 0.
    ``position_ids`` [batch, seq] default to ``0 .. seq-1``; ``attention_mask`` [batch, 1, seq, seq]
    bool (True = may not attend, Megatron's convention) replaces the causal mask, e.g. a
    block-diagonal causal mask for packed documents (refused for sliding-window models, whose
    attention builds its own window mask and would ignore it).

    ``router_aux_loss`` (mixture-of-experts models): add ``router_aux_loss_coef`` times the
    family's load-balancing loss, as transformers does with ``output_router_logits=True``;
    ``None`` follows the model's ``config.json`` (``output_router_logits``). That loss is not a
    token mean: each micro-batch's is the one a single device computes on that micro-batch, and
    the step's is their mean over micro-batches and data-parallel ranks (what averaging the
    replicas' ``loss + coef * aux`` gives). With pipeline parallelism it costs one extra
    forward-only pass per step (:mod:`dist_lora.models.router_loss`).
    DoRA's detached weight norms are computed once, before the first micro-batch (row layers: one
    all-reduce for the stage), and read by every forward (:func:`dist_lora.layers.dora.held_norms`).
    """
    with held_norms(dora_slots(model)):
        return _forward_backward(model, input_ids, labels, num_microbatches, forward_only, position_ids,
                                 attention_mask, router_aux_loss)


def _forward_backward(model, input_ids, labels, num_microbatches, forward_only, position_ids,
                      attention_mask, router_aux_loss) -> torch.Tensor:
    info = model_info(model)
    groups, spec = info.groups, info.spec
    batch, seq = input_ids.shape
    if batch % num_microbatches:
        raise ValueError(f"batch size {batch} does not split into {num_microbatches} micro-batches")
    if groups.sequence_parallel and seq % groups.tp_size:
        raise ValueError(f"sequence length {seq} must be divisible by the TP size {groups.tp_size} with SP")
    coefficient = _aux_coefficient(spec, groups, router_aux_loss)
    if attention_mask is not None and spec.sliding_window is not None:
        raise ValueError("an attention_mask cannot be combined with a sliding-window model: Megatron's local "
                         "attention replaces it with its window mask (documents would see each other)")
    device = module_device(model)  # the batch moves to the model; every tensor made here is made there
    input_ids, labels = input_ids.to(device), labels.to(device)
    scale = groups.dp_size / token_count(labels, groups).clamp(min=1).item()
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    position_ids = position_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    micro = list(zip(input_ids.chunk(num_microbatches), labels.chunk(num_microbatches),
                     position_ids.chunk(num_microbatches), _chunks(attention_mask, num_microbatches)))
    aux_total = torch.zeros((), device=device)  # sum over micro-batches of coefficient * aux / num_microbatches
    if groups.pp_size == 1:
        total = torch.zeros((), device=device)
        for ids, lab, pos, mask in micro:
            summed, aux = _micro_batch_loss(model, ids, pos, mask, lab, spec, groups, coefficient)
            aux = aux / num_microbatches
            if not forward_only:
                (summed * scale + aux).backward()
            total += summed.detach()
            aux_total += aux.detach()
    else:
        routing = None
        if coefficient is not None:  # a forward-only pass first: every layer's routing counts
            routing = MicroBatchRouting(model, spec.experts.num_experts, num_microbatches)
            with routing:
                sums = _pipeline(model, micro, spec, groups, scale, seq, True, routing)
            aux, grads = routing.losses(groups.tp_group, groups.pp_group)
            aux_total = coefficient * aux.sum() / num_microbatches
        if routing is None or not forward_only:
            if routing is None:
                sums = _pipeline(model, micro, spec, groups, scale, seq, forward_only)
            else:
                with RouterLossGradients(model, grads, coefficient / num_microbatches) as attached:
                    sums = _pipeline(model, micro, spec, groups, scale, seq, False, attached)
        total = torch.stack(sums).sum() if sums else torch.zeros((), device=device)
        total = broadcast_(total.clone(), groups.pp_size - 1, groups.pp_group)
    if coefficient is not None:  # the auxiliary term: its mean over the DP replicas
        both = torch.stack([total * scale, aux_total])
        if groups.dp_size > 1:
            both = all_reduce_(both, groups.dp_group)
        return (both[0] + both[1]) / groups.dp_size
    if groups.dp_size > 1:
        total = all_reduce_(total.clone(), groups.dp_group)
    return total * (scale / groups.dp_size)


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
    """Make ``.grad`` the step's gradient on every rank. Call after backward (all micro-batches),
    before the step.

    * Data parallel: average over DP ranks (Megatron DDP's buckets when :func:`use_megatron_ddp`
      is on, else this function's own buckets); DDP's buffers are then cleared. A routed expert's
      parameters (Megatron's mark: ``allreduce = False``) saw the tokens of every rank that routed
      to it, so their gradient is already a sum over part of the dense DP group: it is summed over
      the expert's replicas (the expert-data-parallel group) and divided by the dense DP size, as
      Megatron-Core's DDP does for expert buffers.
    * Tensor parallel: sum over TP the gradients that are partial sums per rank: parameters
      marked ``sequence_parallel`` (norm weights, row-parallel biases under SP) and the replicated
      adapter factors whose products join the base layer's collectives (``lora_A`` of column
      layers; ``lora_B``, DoRA magnitude and ``lora_bias`` of row layers; AdaLoRA's Lambda). One
      all-reduce per bucket, once per step, however many micro-batches and layers there are.
    """
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
    with_grad = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    rest = [p for p in with_grad if id(p) not in bucketed]
    dense = [p.grad for p in rest if getattr(p, "allreduce", True)]
    experts = [p.grad for p in rest if not getattr(p, "allreduce", True)]  # routed experts': their replicas
    if groups.dp_size > 1:
        all_reduce_coalesced_(dense, groups.dp_group)
    if experts and groups.edp_size > 1:
        all_reduce_coalesced_(experts, groups.edp_group)
    if groups.dp_size > 1:
        for grad in dense + experts:
            grad.div_(groups.dp_size)
    if groups.tp_size > 1:
        partial = {id(p) for _, layer in adapter_layers(model) for p in layer.tp_partial_gradients()}
        if groups.sequence_parallel:
            partial.update(id(p) for p in with_grad if getattr(p, "sequence_parallel", False))
        all_reduce_coalesced_([p.grad for p in with_grad if id(p) in partial], groups.tp_group)


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
    device = module_device(model)
    dense, experts, grads = torch.zeros((), device=device), torch.zeros((), device=device), []
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
