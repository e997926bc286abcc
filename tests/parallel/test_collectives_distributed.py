"""Each differentiable collective against the single-device computation it stands for, forward
and backward, plus the agreement helpers that keep ranks out of one-sided collectives."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from dist_lora.parallel import agreement as A
from dist_lora.parallel import collectives as C
from dist_lora.testing import check, distributed_tests


def _inputs(world, shape, seed=0):
    """Every rank's input (rank r's is inputs[r]); identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(world)]


def _run(fn, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad


@check("tp2", "tp4")
def differentiable_collectives_match_single_device_math(ctx):
    group, p, r = ctx.groups.tp_group, ctx.groups.tp_size, ctx.groups.tp_rank
    xs = _inputs(p, (4, 8))
    gs = _inputs(p, (4, 8), seed=1)  # each rank's upstream gradient (same shape as x)
    x, gout = xs[r], gs[r]

    y, gx = _run(lambda t: C.copy_to_group(t, group), x, gout)
    assert torch.equal(y, x) and torch.allclose(gx, sum(gs))

    y, gx = _run(lambda t: C.reduce_from_group(t, group), x, gout)
    assert torch.allclose(y, sum(xs)) and torch.equal(gx, gout)

    full_grads = _inputs(1, (4, 8 * p), seed=2)[0]  # upstream grad of a gathered tensor: same on all ranks
    y, gx = _run(lambda t: C.gather_last_dim(t, group), x, full_grads)
    assert torch.equal(y, torch.cat(xs, -1)) and torch.equal(gx, full_grads.chunk(p, -1)[r])

    full = torch.cat(xs, -1)
    y, gx = _run(lambda t: C.split_last_dim(t, group), full, gout)
    assert torch.equal(y, xs[r]) and torch.equal(gx, torch.cat(gs, -1))

    seq_grads = _inputs(1, (4 * p, 8), seed=3)[0]
    y, gx = _run(lambda t: C.gather_first_dim(t, group), x, seq_grads)
    assert torch.equal(y, torch.cat(xs, 0))
    # backward of an all-gather is a reduce-scatter of the (here identical) upstream grads
    assert torch.allclose(gx, p * seq_grads.chunk(p, 0)[r])

    partial = _inputs(p, (4 * p, 8), seed=4)
    y, gx = _run(lambda t: C.reduce_scatter_first_dim(t, group), partial[r], gs[r])
    assert torch.allclose(y, sum(partial).chunk(p, 0)[r]) and torch.equal(gx, torch.cat(gs, 0))

    y, gx = _run(lambda t: C.split_first_dim(t, group), torch.cat(xs, 0), gout)
    assert torch.equal(y, xs[r]) and torch.equal(gx, torch.cat(gs, 0))


@check("tp2")
def object_and_tensor_helpers(ctx):
    group, r = ctx.groups.tp_group, ctx.groups.tp_rank
    assert C.all_gather_object(r * 10, group) == [0, 10]
    assert C.broadcast_object({"from": r}, 1, group) == {"from": 1}
    parts = C.gather_to(torch.full((2,), float(r)), 0, group)
    assert (parts is None) == (r != 0)
    if parts is not None:
        assert torch.equal(torch.stack(parts), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert C.broadcast_(torch.tensor([float(r + 5)]), 1, group).item() == 6.0
    same, differs = torch.ones(3), torch.full((3,), float(r))
    assert A.all_equal_tensors([same, differs], group) == [True, False]


@check("tp2", "tp4")
def raise_if_any_raises_on_every_rank(ctx):
    A.raise_if_any(None, what="nothing")  # no error anywhere: returns on every rank
    error = ValueError("bad shard") if ctx.groups.rank == 1 else None
    with pytest.raises(A.RankError, match=r"reading failed on 1 rank\(s\):\n  rank 1: ValueError: bad shard"):
        A.raise_if_any(error, what="reading")


@check("tp2")
def check_same_on_all_ranks_detects_divergence(ctx):
    A.check_same_on_all_ranks({"r": 8}, what="config")
    with pytest.raises(A.RankError, match=r"config differs between ranks: ranks \[1, 3\]"):
        A.check_same_on_all_ranks({"r": 8 + ctx.groups.rank % 2}, what="config")


@check("tp2", "tp2-pp2")
def every_process_group_waits_the_jobs_timeout(ctx):
    """The default group, every Megatron group and a group created later without a timeout (as
    DeepSpeed creates them) wait DIST_LORA_TIMEOUT_S (120 s in this harness), not 30 minutes."""
    want = datetime.timedelta(seconds=float(os.environ["DIST_LORA_TIMEOUT_S"]))

    def timeout(group):
        return group._get_backend(torch.device("cpu")).options._timeout

    g = ctx.groups
    groups = [g.tp_group, g.pp_group, g.dp_group, g.model_parallel_group, *distributed_c10d._world.pg_map]
    assert len(groups) > 8 and {timeout(group) for group in groups} == {want}
    assert timeout(dist.new_group(list(range(ctx.world_size)))) == want


test_collectives_distributed = distributed_tests(__name__, world_size=4)
