"""Sharded decompositions (dist_lora.parallel.linalg) against LAPACK on the whole matrix: exact SVD up
to the sign of each singular pair, randomised SVD by subspace angle and reconstruction error,
tall-skinny QR by reconstruction and orthogonality. Rows, columns and replicated layouts."""

from __future__ import annotations

import pytest
import torch

from dist_lora.parallel import linalg
from dist_lora.testing import check, distributed_tests


def _matrix(m, n, seed=0):
    """A matrix with a decaying spectrum (distinct leading singular values), same on all ranks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    s = torch.logspace(1, -2, min(m, n))
    return u @ torch.diag(s) @ v.t()


def _shard(w, dim, p, r):
    return w if dim is None else w.chunk(p, dim)[r]


def _gather(x, dim, ctx):
    from dist_lora.parallel import collectives as C
    return x if dim is None else torch.cat(C.all_gather_tensors(x.contiguous(), ctx.groups.tp_group), dim)


def _principal_cosines(a, b):
    """Cosines of the principal angles between the column spaces of a and b (both orthonormal)."""
    return torch.linalg.svdvals(a.t().double() @ b.double())


@check("tp2", "tp4")
def exact_svd_of_sharded_matrix_equals_lapack(ctx):
    p, r, group = ctx.groups.tp_size, ctx.groups.tp_rank, ctx.groups.tp_group
    # (16, 96) on rows and (96, 16) on columns split the short side: the sharded-side Gram path
    for m, n in ((48, 32), (32, 48), (64, 64), (16, 96), (96, 16)):
        w = _matrix(m, n)
        u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)
        for dim in (0, 1, None):
            u, s, vh = linalg.svd(_shard(w, dim, p, r), dim, group, rank=6)
            u = _gather(u, 0 if dim == 0 else None, ctx)
            vh = _gather(vh, 1 if dim == 1 else None, ctx)
            torch.testing.assert_close(s, s_ref[:6], rtol=1e-5, atol=1e-6)
            signs = torch.sign((u * u_ref[:, :6]).sum(0))
            torch.testing.assert_close(u * signs, u_ref[:, :6], rtol=0, atol=1e-5)
            torch.testing.assert_close(vh * signs[:, None], vh_ref[:6], rtol=0, atol=1e-5)


@check("tp2")
def randomised_svd_finds_the_leading_subspace(ctx):
    p, r, group = ctx.groups.tp_size, ctx.groups.tp_rank, ctx.groups.tp_group
    w = _matrix(64, 40, seed=1)
    u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)
    for dim in (0, 1, None):
        g = torch.Generator().manual_seed(7)
        u, s, vh = linalg.svd_lowrank(_shard(w, dim, p, r), dim, group, rank=8, niter=4, generator=g)
        u = _gather(u, 0 if dim == 0 else None, ctx)
        vh = _gather(vh, 1 if dim == 1 else None, ctx)
        assert _principal_cosines(u[:, :4], u_ref[:, :4]).min() > 1 - 1e-6
        torch.testing.assert_close(s[:4], s_ref[:4], rtol=1e-5, atol=0)
        best = (w - u_ref[:, :8] @ torch.diag(s_ref[:8]) @ vh_ref[:8]).norm()
        assert (w - u @ torch.diag(s) @ vh).norm() <= best * 1.05


@check("tp2")
def tall_skinny_qr_reconstructs(ctx):
    p, r, group = ctx.groups.tp_size, ctx.groups.tp_rank, ctx.groups.tp_group
    a = _matrix(64, 6, seed=2)
    q, rr = linalg.tall_skinny_qr(a.chunk(p, 0)[r], group)
    q = _gather(q, 0, ctx)
    torch.testing.assert_close(q @ rr, a.double(), rtol=0, atol=1e-10)
    torch.testing.assert_close(q.t() @ q, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (torch.diagonal(rr) > 0).all()
    q_ref, r_ref = torch.linalg.qr(a.double())
    d = torch.sign(torch.diagonal(r_ref))
    torch.testing.assert_close(q, q_ref * d, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="linearly dependent"):
        linalg.tall_skinny_qr(torch.zeros(32 // p, 3), group)


test_linalg_distributed = distributed_tests(__name__, world_size=4)
