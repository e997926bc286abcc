"""Every collective dist_lora runs, in one module.

Two kinds live here:

* Differentiable collectives, each a ``torch.autograd.Function`` whose backward is the
  conjugate of its forward (as in Megatron-Core's ``tensor_parallel/mappings.py``), with a
  snake_case wrapper that takes the process group explicitly:

  ============================  ===============================  ==============================
  wrapper                       forward                          backward
  ============================  ===============================  ==============================
  ``copy_to_group``             identity                         all-reduce (sum)
  ``count_once``                identity                         keep on rank 0, zeros elsewhere
  ``reduce_from_group``         all-reduce (sum)                 identity
  ``gather_last_dim``           all-gather along the last dim    keep own slice
  ``split_last_dim``            keep own slice of last dim       all-gather along the last dim
  ``gather_first_dim``          all-gather along dim 0           reduce-scatter along dim 0
  ``reduce_scatter_first_dim``  reduce-scatter along dim 0       all-gather along dim 0
  ``split_first_dim``           keep own slice of dim 0          all-gather along dim 0
  ============================  ===============================  ==============================

* Plain (non-differentiable) collectives: all-reduce (one tensor or coalesced buckets),
  broadcasts of tensors and objects, gathering a shard to one rank.

Agreeing across ranks (errors raised on every rank together, equality checks) is built on these
in :mod:`dist_lora.parallel.agreement`.

A ``group`` of ``None`` means the default (world) group. With one rank in the group every
function is the identity and no communication happens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

Group = Any  # torch.distributed.ProcessGroup | None

# One-buffer all-gather / reduce-scatter: the ``*_single`` names of torch >= 2.13 (which deprecates
# ``all_gather_into_tensor`` / ``reduce_scatter_tensor``), the older names before.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: Group = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def group_rank(group: Group = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def process_group_ranks(obj: Any) -> tuple[int, ...] | None:
    """The global ranks of ``obj`` if it is a process group, boxed (as ``c10d`` operators receive
    it, a ``ScriptObject``) or not; else ``None``."""
    if isinstance(obj, torch.ScriptObject):
        try:
            obj = dist.ProcessGroup.unbox(obj)
        except (RuntimeError, TypeError):
            return None
    return tuple(dist.get_process_group_ranks(obj)) if isinstance(obj, dist.ProcessGroup) else None


def global_rank(group: Group, group_rank_: int) -> int:
    """Global rank of ``group_rank_`` inside ``group``."""
    if not is_initialized():
        return 0
    return dist.get_global_rank(group, group_rank_) if group is not None else group_rank_


# ----------------------------------------------------------------------------------------
# raw tensor collectives (no autograd)
# ----------------------------------------------------------------------------------------


def all_reduce_(tensor: torch.Tensor, group: Group = None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce; ``op`` is ``sum``, ``max`` or ``min``."""
    if group_size(group) > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def all_reduce_coalesced_(tensors: Sequence[torch.Tensor], group: Group = None,
                          bucket_elems: int = 40_000_000) -> None:
    """Sum each tensor over ``group`` in place, with one all-reduce per bucket: tensors of one
    dtype and device are flattened into contiguous buckets of at most ``bucket_elems`` elements
    (a tensor larger than that is a bucket of its own), reduced, and copied back."""
    if group_size(group) == 1 or not tensors:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for tensor in tensors:
        runs = buckets.setdefault((tensor.dtype, tensor.device), [[]])
        if runs[-1] and sum(t.numel() for t in runs[-1]) + tensor.numel() > bucket_elems:
            runs.append([])
        runs[-1].append(tensor)
    for runs in buckets.values():
        for run in runs:
            flat = torch.cat([t.reshape(-1) for t in run])
            dist.all_reduce(flat, group=group)
            for tensor, part in zip(run, flat.split([t.numel() for t in run])):
                tensor.copy_(part.view_as(tensor))


def _all_gather_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)  # one buffer, rank-major along dim 0
    return out if dim % x.dim() == 0 else torch.cat(out.chunk(world, dim=0), dim=dim)


def _split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.size(dim) % world:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} does not split over {world} ranks")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _reduce_scatter_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.size(0) % world:
        raise ValueError(f"dimension 0 of size {x.size(0)} does not split over {world} ranks")
    out = torch.empty((x.size(0) // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def broadcast_(tensor: torch.Tensor, src_group_rank: int, group: Group = None) -> torch.Tensor:
    """In-place broadcast from ``src_group_rank`` (a rank *within* ``group``)."""
    if group_size(group) > 1:
        dist.broadcast(tensor, src=global_rank(group, src_group_rank), group=group)
    return tensor


def gather_to(x: torch.Tensor, dst_group_rank: int, group: Group = None) -> list[torch.Tensor] | None:
    """Gather equally shaped tensors to one rank; returns the list there and ``None`` elsewhere."""
    world = group_size(group)
    if world == 1:
        return [x]
    x = x.contiguous()
    me = group_rank(group)
    parts = [torch.empty_like(x) for _ in range(world)] if me == dst_group_rank else None
    dist.gather(x, parts, dst=global_rank(group, dst_group_rank), group=group)
    return parts


def all_gather_tensors(x: torch.Tensor, group: Group = None) -> list[torch.Tensor]:
    """Every rank's equally shaped ``x``, in group-rank order, on every rank (no autograd)."""
    if group_size(group) == 1:
        return [x]
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


def barrier(group: Group = None) -> None:
    if group_size(group) > 1:
        dist.barrier(group=group)


# ----------------------------------------------------------------------------------------
# differentiable collectives
# ----------------------------------------------------------------------------------------


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CountOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.first = group_rank(group) == 0
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.first else torch.zeros_like(grad)), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_dim(grad, -1, ctx.group), None


class _SplitLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, -1, ctx.group), None


class _GatherFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_first(grad, ctx.group), None


class _ReduceScatterFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, 0, ctx.group), None


class _SplitFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, 0, ctx.group), None


def _spans(group: Group) -> bool:
    """Whether a differentiable collective over ``group`` communicates. ``None`` here means *no*
    group (an unsharded layer, e.g. a plain ``nn.Linear`` with TP = 1), never the whole world:
    a data-parallel job must not sum a TP-free layer's activations over its DP replicas."""
    return group is not None and group_size(group) > 1


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (enter a tensor-parallel region)."""
    return _CopyToGroup.apply(x, group) if _spans(group) else x


def count_once(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; backward keeps the gradient on the group's first rank and gives zeros
    elsewhere. For a replicated tensor whose gradient is summed over ``group`` later (the
    partial-sum gradients ``finalize_grads`` reduces), a gradient that every rank computes in
    full must enter that sum once."""
    return _CountOnce.apply(x, group) if _spans(group) else x


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (leave a row-parallel region)."""
    return _ReduceFromGroup.apply(x, group) if _spans(group) else x


def gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., n/p] -> [..., n] forward; backward keeps this rank's slice."""
    return _GatherLastDim.apply(x, group) if _spans(group) else x


def split_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., n] -> [..., n/p] forward; backward all-gathers."""
    return _SplitLastDim.apply(x, group) if _spans(group) else x


def gather_first_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s/p, ...] -> [s, ...] forward (sequence parallel); backward reduce-scatters."""
    return _GatherFirstDim.apply(x, group) if _spans(group) else x


def reduce_scatter_first_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, ...] partial sums -> [s/p, ...] reduced forward; backward all-gathers."""
    return _ReduceScatterFirstDim.apply(x, group) if _spans(group) else x


def split_first_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, ...] -> [s/p, ...] forward; backward all-gathers."""
    return _SplitFirstDim.apply(x, group) if _spans(group) else x


# ----------------------------------------------------------------------------------------
# objects and agreement
# ----------------------------------------------------------------------------------------


def all_gather_object(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in group-rank order, on every rank."""
    world = group_size(group)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src_group_rank: int = 0, group: Group = None) -> Any:
    """``obj`` of ``src_group_rank`` on every rank."""
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=global_rank(group, src_group_rank), group=group)
    return box[0]
