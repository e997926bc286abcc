"""PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948) on a TP-sharded weight.

PEFT's ``pissa_init`` on the global ``W`` [m, n] (float32): ``W ≈ U_r S_r V_rᵀ`` (exact SVD, or
``torch.svd_lowrank`` with ``niter`` for ``"pissa_niter_K"``), ``S_r /= scaling``,
``A = diag(sqrt S_r) V_rᵀ`` [r, n], ``B = U_r diag(sqrt S_r)`` [m, r], base ``W - scaling B A``.

Here the SVD is :func:`dist_lora.parallel.linalg.svd` / :func:`~dist_lora.parallel.linalg.svd_lowrank` of the
sharded ``W``: the factor along the sharded side stays sharded (``U`` rows for a
column-parallel layer, ``V`` rows for a row-parallel one), so ``B`` / ``A`` come out in their
adapter layouts. Singular vector signs may differ from LAPACK's (``B A`` does not).
"""

from __future__ import annotations

import torch

from dist_lora.parallel import linalg


def factors(weight, r: int, scaling: float, niter: int | None, generator: torch.Generator, config):
    """Local ``(lora_A, lora_B, new base shard)`` (float32) of ``weight`` (a ShardedWeight)."""
    if niter is None:
        u, s, vh = linalg.svd(weight.local, weight.dim, weight.group, r)
    else:
        u, s, vh = linalg.svd_lowrank(weight.local, weight.dim, weight.group, r, niter, generator)
    root = (s / scaling).sqrt()
    a = root.unsqueeze(1) * vh
    b = u * root
    return a, b, weight.local - scaling * (b @ a)
