"""Incremental PCA of one layer's inputs, computed from shards with compact sketches.

The state is PEFT's ``IncrementalPCA`` state (sklearn's algorithm): ``components`` [k, h],
``singular_values`` [k], ``mean`` / ``var`` [h] (float64) and the number of samples seen. One
step (``partial_fit``) on a batch X [n, h] factors the stacked matrix

    M = [ diag(S_old) V_old ;  X - mean(X) ;  sqrt(n_old n / (n_old + n)) (mean_old - mean(X)) ]

and keeps its top k right-singular vectors. Here X is spread over ranks in two ways:

* **rows** (tokens) over the *row groups*: data-parallel ranks read different batches, and under
  sequence parallelism a column layer's TP ranks hold different sequence chunks. The batch
  statistics are one all-reduce of [1 + 2h] floats (count, sum, centred sum of squares), so
  ``mean``/``var`` are exact. The SVD of the row-split M is a subspace iteration in feature
  space (``_row_sharded_svd``): each step all-reduces ``M_i^T (M_i Z)`` [h, q], q = 2k as PEFT's
  ``svd_lowrank``, so messages are q x hidden whatever the number of tokens, raw activations
  never travel, and the accuracy is that of PEFT's randomised SVD with 4 power iterations. (Stacking
  per-rank truncated SVDs instead would be cheaper but loses the local tails: 0.99 subspace
  cosines on flat spectra, which is why it is not used.)
* **features** over the *feature group*: a row-parallel layer's input is split on h. The SVD of
  a column-split matrix B [m, h] uses the sample-space Gram ``G = sum_t B_t B_t^T`` [m, m]
  (one all-reduce over TP): ``G = U L U^T`` gives ``S = sqrt(L)`` and each rank's slice of
  ``V^T = S^-1 U^T B_t`` with no further communication. Blocks taller than ``EXACT_ROWS`` first
  go through a randomised range finder whose messages are [m, q] partial products. Components stay split like ``lora_A``
  of a row layer, which is where they go.

Signs follow PEFT's ``svd_flip(u_based_decision=False)``: the largest-|.| entry of each
component is made positive (a [k]-sized all-gather over the feature group finds it). Everything
after the all-reduces is computed identically on every rank of a row group, so the state is
replicated over data-parallel ranks.
"""

from __future__ import annotations

import torch

from dist_lora.parallel.collectives import all_gather_tensors, all_reduce_, group_rank, group_size
from dist_lora.parallel.device import collective_device


def _sketch(rows: int, cols: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A Gaussian test matrix [rows, cols] from a CPU generator (the same numbers on every device),
    in ``like``'s dtype on its device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=like.dtype, device="cpu").to(like.device)


class CommMeter:
    """Bytes this rank sends in EVA collectives (what a ring would move per rank, roughly the
    tensor size for all-gathers and all-reduces), for the benchmark."""

    def __init__(self):
        self.bytes = 0

    def add(self, tensor: torch.Tensor, group) -> None:
        if group_size(group) > 1:
            self.bytes += tensor.numel() * tensor.element_size()


# Blocks with more rows than this are sketched with a randomised range finder (Halko et al.,
# https://arxiv.org/abs/0909.4061, as torch.svd_lowrank / PEFT's lowrank IPCA); smaller ones exactly.
EXACT_ROWS = 512
POWER_ITERATIONS = 4


def _sum(x: torch.Tensor, feature_group, meter: "CommMeter") -> torch.Tensor:
    if feature_group is not None:
        meter.add(x, feature_group)
        all_reduce_(x, feature_group)
    return x


def _exact_svd(block: torch.Tensor, feature_group, meter: "CommMeter", keep: int):
    if feature_group is None:
        _, s, vt = torch.linalg.svd(block, full_matrices=False)
    else:  # sample-space Gram [m, m] summed over the feature shards
        evals, evecs = torch.linalg.eigh(_sum(block @ block.T, feature_group, meter))
        s, u = evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)
        c = int((s > 0).sum())
        s, vt = s[:c], (u[:, :c].T @ block) / s[:c, None]
    c = min(keep, int((s > s.max() * 1e-10).sum()) if s.numel() else 0)
    return s[:c], vt[:c]


def _sharded_svd(block: torch.Tensor, feature_group, meter: "CommMeter", keep: int):
    """Top ``keep`` singular values [c] and local right-singular rows [c, h_local] of ``block``
    [m, h_local] whose columns are split over ``feature_group`` (``None``: not split), float64.

    Tall blocks go through a randomised range finder: ``Q = orth(B B^T ... B Omega)`` needs only
    [m, keep] all-reduces over the feature group (``B_t Omega_t`` and ``B_t (B_t^T Q)`` are partial
    sums), then ``Q^T B`` [keep, h_local] is split like B and solved exactly."""
    if block.shape[0] <= max(EXACT_ROWS, 2 * keep):
        return _exact_svd(block, feature_group, meter, keep)
    rank = group_rank(feature_group) if feature_group is not None else 0
    omega = _sketch(block.shape[1], keep, 42 + rank, block)
    q = torch.linalg.qr(_sum(block @ omega, feature_group, meter)).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(_sum(block @ (block.T @ q), feature_group, meter)).Q
    return _exact_svd(q.T @ block, feature_group, meter, keep)


def _orthonormal(z: torch.Tensor, feature_group, meter: "CommMeter") -> torch.Tensor:
    """Orthonormal columns spanning ``z`` [h_local, q] (rows split over ``feature_group``):
    eigen-decomposition of the [q, q] Gram summed over the shards; null directions are dropped."""
    evals, evecs = torch.linalg.eigh(_sum(z.T @ z, feature_group, meter))
    live = evals > evals.max().clamp_min(1e-300) * 1e-12
    return z @ (evecs[:, live] / evals[live].sqrt())


def _row_sharded_svd(block: torch.Tensor, row_groups, feature_group, meter: "CommMeter", q: int):
    """Top singular values and local right-singular rows of M = [block_1; ...; block_d], whose row
    blocks [m_i, h_local] sit on the ranks of ``row_groups`` (and columns on ``feature_group``).

    Subspace iteration in feature space (Halko et al., Alg. 4.4, the scheme of torch.svd_lowrank):
    ``Z <- orth(M^T M Z)`` with ``M^T M Z = sum_i M_i^T (M_i Z)``, an all-reduce of [h_local, q]
    over the row groups (and [m_i, q] over the feature group when features are split), then the
    [q, q] Gram of ``M Z`` gives S and V = Z U. Every message is q x hidden or smaller; no
    activation leaves its rank, and the result is the same on every rank."""
    rank = group_rank(feature_group) if feature_group is not None else 0
    z = _sketch(block.shape[1], q, 42 + rank, block)
    for _ in range(POWER_ITERATIONS + 1):
        z = _orthonormal(z, feature_group, meter)
        z = _sum_rows(block.T @ _sum(block @ z, feature_group, meter), row_groups, meter)
    z = _orthonormal(z, feature_group, meter)
    y = _sum(block @ z, feature_group, meter)
    evals, evecs = torch.linalg.eigh(_sum_rows(y.T @ y, row_groups, meter))
    evals, evecs = evals.flip(0), evecs.flip(1)
    c = int((evals > evals[0].clamp_min(1e-300) * 1e-20).sum())
    return evals[:c].clamp_min(0).sqrt(), (z @ evecs[:, :c]).T


def _sum_rows(x: torch.Tensor, row_groups, meter: "CommMeter") -> torch.Tensor:
    for g in row_groups:
        meter.add(x, g)
        all_reduce_(x, g)
    return x


def _flip_signs(vt: torch.Tensor, feature_group, meter: CommMeter) -> torch.Tensor:
    """PEFT's ``svd_flip(u_based_decision=False)`` on rows split over ``feature_group``."""
    if vt.shape[0] == 0:
        return vt
    idx = vt.abs().argmax(dim=1)
    best = vt.gather(1, idx[:, None]).squeeze(1)
    if feature_group is not None:
        parts = all_gather_tensors(best, feature_group)
        meter.add(best, feature_group)
        stacked = torch.stack(parts)  # [tp, c]; argmax keeps the first (lowest feature) maximum
        best = stacked.gather(0, stacked.abs().argmax(dim=0)[None]).squeeze(0)
    return vt * torch.sign(best)[:, None]


class ShardedIncrementalPCA:
    """PEFT's ``IncrementalPCA`` over rows split by ``row_groups`` and features by ``feature_group``.

    Args:
        n_components: k.
        row_groups: process groups whose ranks hold different tokens (data parallel; plus TP
            under sequence parallelism for column layers). ``None`` entries are skipped.
        feature_group: group whose ranks hold different slices of the features (TP for row
            layers), or ``None``.
        tau: a component has converged when its cosine similarity to the previous step's is >= tau.
        sketch_rank: q, the width of the randomised subspace (default ``2 * n_components``, PEFT's
            ``lowrank_q``).
    """

    def __init__(self, n_components: int, tau: float, row_groups=(), feature_group=None,
                 sketch_rank: int | None = None, meter: CommMeter | None = None):
        self.n_components, self.tau = n_components, tau
        self.row_groups = [g for g in row_groups if g is not None and group_size(g) > 1]
        self.feature_group = feature_group if feature_group is not None and group_size(feature_group) > 1 else None
        self.sketch_rank = sketch_rank or 2 * n_components
        self.meter = meter or CommMeter()
        self.components = None  # [k, h_local] float64
        self.singular_values = None
        self.explained_variance_ratio = None
        self.mean = self.var = None
        self.n_seen = 0
        self.converged = torch.zeros(n_components, dtype=torch.bool, device="cpu")  # until the first step

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def _leads_rows(self) -> bool:
        return all(group_rank(g) == 0 for g in self.row_groups)

    def batch_count(self, n_local: int) -> int:
        """Tokens of this step over all row groups (one tiny all-reduce)."""
        count = torch.tensor([float(n_local)], dtype=torch.float64, device=collective_device())
        return int(_sum_rows(count, self.row_groups, self.meter).item())

    def _batch_stats(self, x: torch.Tensor):
        """Global batch count, mean and unnormalised variance (sum of squared deviations)."""
        n_i = x.shape[0]
        local_mean = x.mean(0) if n_i else x.new_zeros(x.shape[1])
        m2 = (x - local_mean).square().sum(0)
        packed = torch.cat([x.new_tensor([float(n_i)]), x.sum(0), m2 + n_i * local_mean.square()])
        _sum_rows(packed, self.row_groups, self.meter)
        n = int(packed[0].item())
        total, h = packed[1:1 + x.shape[1]], x.shape[1]
        mean = total / n
        return n, total, mean, packed[1 + h:] - n * mean.square()

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        """One step on this rank's rows ``x`` [n_i, h_local] (collective over all groups)."""
        x = x.to(torch.float64)
        n, new_sum, batch_mean, new_m2 = self._batch_stats(x)
        n_old = self.n_seen
        n_total = n_old + n
        if self.mean is None:
            mean, var = batch_mean, new_m2 / n_total
        else:
            last_sum = self.mean * n_old
            mean = (last_sum + new_sum) / n_total
            ratio = n_old / n
            var = (self.var * n_old + new_m2 + ratio / n_total * (last_sum / ratio - new_sum).square()) / n_total
        block = x - batch_mean
        if self.components is not None and self._leads_rows():
            correction = ((n_old / n_total) * n) ** 0.5 * (self.mean - batch_mean)
            block = torch.cat([self.singular_values[:, None] * self.components, block, correction[None]])
        if self.row_groups:
            s, vt = _row_sharded_svd(block, self.row_groups, self.feature_group, self.meter, self.sketch_rank)
        else:
            s, vt = _sharded_svd(block, self.feature_group, self.meter, self.sketch_rank)
        vt = _flip_signs(vt, self.feature_group, self.meter)
        var_total = (var * n_total).sum().reshape(1)
        if self.feature_group is not None:
            self.meter.add(var_total, self.feature_group)
            all_reduce_(var_total, self.feature_group)
        k = self.n_components
        previous = self.components
        self.components, self.singular_values = vt[:k].contiguous(), s[:k].contiguous()
        self.explained_variance_ratio = s[:k].square() / var_total
        self.mean, self.var, self.n_seen = mean, var, n_total
        if previous is not None:
            self.converged = self._cosine(previous)

    def _cosine(self, previous: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine similarity of the new and previous components (global over features)."""
        rows = min(previous.shape[0], self.components.shape[0])
        a, b = self.components[:rows], previous[:rows]
        stats = torch.stack([(a * b).sum(1), a.square().sum(1), b.square().sum(1)])
        if self.feature_group is not None:
            self.meter.add(stats, self.feature_group)
            all_reduce_(stats, self.feature_group)
        cos = stats[0] / (stats[1].sqrt() * stats[2].sqrt()).clamp_min(1e-8)
        converged = torch.zeros(self.n_components, dtype=torch.bool, device=cos.device)
        converged[:rows] = cos >= self.tau
        return converged
