"""Decompositions of a matrix that is sharded over a process group, computed from local shards.

A global matrix ``W`` [m, n] lives on the ranks of ``group`` as blocks along ``dim``: rows
(``dim=0``, each rank holds [m_i, n]), columns (``dim=1``, [m, n_i]) or replicated
(``dim=None``). Every function here returns its factors *in the same layout*: the factor that
spans the sharded dimension stays sharded, the other one is replicated. No rank assembles
``W``; what travels is an [n, n] Gram matrix (exact SVD, n = the unsharded dimension), or
[n, q] / [q, q] sketches (randomised SVD and tall-skinny QR, q = the rank). One exception, for
memory and time: when the sharded side m is the short one (m^2 + two shards < n^2), the exact
SVD forms the [m, m] Gram instead, and for that the other ranks' shards visit one at a time
(a rank holds its own shard and one visiting shard).

Small dense algebra runs in float64: a Gram matrix squares the condition number, and float64
keeps the leading singular vectors as accurate as LAPACK's float32 SVD of the full matrix. The
randomised SVD multiplies ``W`` by its [n, q] sketches in float32, as ``torch.svd_lowrank``
does (those products are its whole cost), and orthogonalises them in float64.
Signs of singular / QR vectors are conventions and may differ from LAPACK's; products such as
``U S Vh`` and every projector are exact.

Results are identical on all ranks of ``group`` for the replicated factors (they are computed
from all-reduced data with the same deterministic kernels).
"""

from __future__ import annotations

import torch

from dist_lora.parallel import collectives as C


def _rows(local: torch.Tensor, dim: int | None) -> torch.Tensor:
    """View the shard as a row block of a row-sharded matrix (transpose a column shard)."""
    if dim not in (0, 1, None):
        raise ValueError(f"dim={dim!r}: a matrix is sharded on 0 (rows), 1 (columns) or None (replicated)")
    return local.t() if dim == 1 else local


def _sum(t: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """Sum of the per-shard partial products over ``group``; a replicated matrix has none."""
    return t if dim is None else C.all_reduce_(t, group)


def svd(local: torch.Tensor, dim: int | None, group, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact leading ``rank`` singular triplets of the global matrix ``W`` (``W ~ U diag(S) Vh``).

    Shapes: ``U`` [m or m_i, rank], ``S`` [rank] (descending), ``Vh`` [rank, n or n_i]; the
    factor along ``dim`` is this rank's shard. One all-reduce of an [k, k] Gram matrix, k the
    unsharded dimension, unless the Gram over the sharded side is the smaller one (a wide
    weight split on its short side, e.g. k_proj [1024, 4096] on rows): then the shards visit
    each other one at a time to build that Gram (:func:`_svd_by_sharded_gram`). A replicated
    matrix (``dim=None``) uses the Gram over its smaller side, with no communication. Returned
    in ``local``'s dtype."""
    if dim is None and local.shape[1] > local.shape[0]:
        u, s, vh = svd(local.t(), None, None, rank)  # W^T = V S U^T: the [m, m] Gram, m < n
        return vh.t(), s, u.t()
    x = _rows(local, dim).double().contiguous()
    if dim is not None:
        rows = [int(t) for t in C.all_gather_tensors(torch.tensor([x.shape[0]], device=x.device), group)]
        if _sharded_side_is_smaller(rows, x.shape[1]):
            return _svd_by_sharded_gram(x, rows, group, rank, dim, local.dtype)
    s, v = _leading_eigenpairs(_sum(x.t() @ x, dim, group), rank)  # v: replicated right vectors
    u = (x @ v) / s.clamp_min(_TINY)  # sharded left vectors
    u, v = _fix_signs(u, v)
    return _orient(u, s, v, dim, local.dtype)


_TINY = torch.finfo(torch.float64).tiny


def _leading_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values [k] (descending) and the matching eigenvectors [g, k] of a Gram matrix."""
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    k = min(rank, evals.numel())
    return evals[-k:].flip(0).clamp_min(0).sqrt(), evecs[:, -k:].flip(1)


def _sharded_side_is_smaller(rows: list[int], n: int) -> bool:
    """Whether the [m, m] Gram over the sharded side (plus two shards in memory) is smaller than
    the [n, n] Gram over the unsharded side: k_proj / v_proj [1024, 4096] split on rows."""
    m = sum(rows)
    return len(rows) > 1 and m * m + 2 * max(rows) * n < n * n


def _svd_by_sharded_gram(x: torch.Tensor, rows: list[int], group, rank: int, dim: int, dtype):
    """Exact SVD of the row-sharded ``x`` [m_i, n] from its [m, m] Gram ``x xᵀ``.

    The Gram's blocks ``x_i x_jᵀ`` pair shards of different ranks, so the shards are broadcast
    one at a time (each rank holds its own and the visiting one, never the stacked matrix); each
    rank fills its block row and one all-reduce of [m, m] completes the Gram. Left vectors come
    from its eigenvectors (this rank keeps its rows), right vectors from one all-reduce of
    ``x_iᵀ u_i`` [n, rank]."""
    me = C.group_rank(group)
    starts = [sum(rows[:j]) for j in range(len(rows) + 1)]
    gram = x.new_zeros(starts[-1], starts[-1])
    for j, count in enumerate(rows):
        visiting = C.broadcast_(x if j == me else x.new_empty(count, x.shape[1]), j, group)
        gram[starts[me]:starts[me + 1], starts[j]:starts[j + 1]] = x @ visiting.t()
    s, u = _leading_eigenpairs(C.all_reduce_(gram, group), rank)
    u = u[starts[me]:starts[me + 1]]  # this rank's rows of the left vectors
    v = C.all_reduce_(x.t() @ u, group) / s.clamp_min(_TINY)  # replicated right vectors
    u, v = _fix_signs(u, v)
    return _orient(u, s, v, dim, dtype)


def svd_lowrank(local: torch.Tensor, dim: int | None, group, rank: int, niter: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised leading ``rank`` singular triplets (Halko et al., as ``torch.svd_lowrank``
    with ``q=rank`` and ``niter`` subspace iterations), layout as :func:`svd`.

    The test matrix is drawn from ``generator``, a CPU generator (seed it identically on every
    rank; the draw is the same on every device), and moved to ``local``'s device. Per
    iteration one all-reduce of an [k, rank] sketch and one tall-skinny QR ([rank, rank])."""
    if niter < 0:
        raise ValueError(f"niter={niter}: the number of subspace iterations must be >= 0")
    x = _rows(local, dim).float()  # products with W in float32 (as torch.svd_lowrank), the rest float64

    def times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.float() @ b.float()).double()

    # A CPU generator (identical on every rank and device), the sketch then moves to W's device.
    omega = torch.randn(x.shape[1], rank, generator=generator, dtype=torch.float64, device="cpu").to(x.device)
    q = _tsqr(times(x, omega), dim, group)[0]
    for _ in range(niter):
        z = torch.linalg.qr(_sum(times(x.t(), q), dim, group))[0]  # replicated [k, rank]
        q = _tsqr(times(x, z), dim, group)[0]
    b = _sum(times(q.t(), x), dim, group)  # replicated [rank, k]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u, v = _fix_signs(q @ ub, vh.t())
    return _orient(u, s, v, dim, local.dtype)


def tall_skinny_qr(local_rows: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """QR of a row-sharded tall matrix [m, q] (m >> q): ``Q`` row-sharded [m_i, q], ``R``
    replicated [q, q] upper triangular with a positive diagonal.

    CholeskyQR2 in float64: two rounds of (all-reduce the [q, q] Gram, Cholesky, solve).
    Raises ``ValueError`` when the columns are linearly dependent."""
    return _tsqr(local_rows, 0, group)


def _tsqr(local_rows: torch.Tensor, dim: int | None, group) -> tuple[torch.Tensor, torch.Tensor]:
    q, r = local_rows.double(), None
    for _ in range(2):
        gram = _sum(q.t() @ q, dim, group)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info):
            raise ValueError("tall_skinny_qr: the columns are linearly dependent (rank-deficient matrix)")
        q = torch.linalg.solve_triangular(chol.t(), q, upper=True, left=False)
        r = chol.t() if r is None else chol.t() @ r
    return q, r


def _fix_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of each right vector (replicated) positive, so the
    result is deterministic whatever the eigen-solver returned."""
    idx = v.abs().argmax(dim=0)
    sign = torch.sign(v[idx, torch.arange(v.shape[1], device=v.device)])
    sign[sign == 0] = 1
    return u * sign, v * sign


def _orient(u, s, v, dim, dtype):
    """Map the row-sharded computation (``x = u diag(s) v^T``) back to ``W``'s orientation."""
    if dim == 1:  # x = W^T, so W = v diag(s) u^T
        return v.to(dtype), s.to(dtype), u.t().to(dtype)
    return u.to(dtype), s.to(dtype), v.t().to(dtype)


def leading_columns_qr(local: torch.Tensor, dim: int | None, group, k: int,
                       col_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """QR of the first ``k`` columns of the global ``W`` [m, n]: ``W[:, :k] = Q R``. Returns
    ``Q`` [m or m_i, k] and ``Qᵀ W`` [k, n or n_i] (the first ``k`` rows of the R of a full QR
    of ``W``), each in ``W``'s layout: a row shard keeps ``Q`` sharded and ``Qᵀ W`` replicated,
    a column shard the other way round.

    Rows sharded (``dim=0``): tall-skinny CholeskyQR2, then one all-reduce of ``Qᵀ W_i``
    [k, n]. Columns sharded (``dim=1``, ``col_offset`` = global index of this shard's first
    column): the [m, k] leading columns are assembled with one all-reduce and factored locally
    (Householder, identical on every rank); ``Qᵀ W_i`` needs no communication. Signs of the
    columns of ``Q`` follow a positive diagonal of R (LAPACK may flip some). Float64 inside,
    returned in ``local``'s dtype."""
    x = local.double()
    if dim == 0:
        q = _tsqr(x[:, :k], 0, group)[0]
        return q.to(local.dtype), C.all_reduce_(q.t() @ x, group).to(local.dtype)
    lead = x[:, :k] if dim is None else _leading_columns(x, group, k, col_offset)
    q, r = torch.linalg.qr(lead)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1
    q = q * sign
    return q.to(local.dtype), (q.t() @ x).to(local.dtype)


def _leading_columns(x: torch.Tensor, group, k: int, col_offset: int) -> torch.Tensor:
    """Global columns [0, k) of a column-sharded matrix, replicated: each rank adds its part."""
    lead = x.new_zeros(x.shape[0], k)
    lo, hi = col_offset, min(col_offset + x.shape[1], k)
    if hi > lo:
        lead[:, lo:hi] = x[:, : hi - lo]
    return C.all_reduce_(lead, group)
