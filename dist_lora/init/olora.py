"""OLoRA (Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775) on a TP-sharded weight.

PEFT's ``olora_init`` on the global ``W`` [m, n] (float32): ``Q, R = qr(W)``, ``B = Q[:, :r]``
[m, r], ``A = R[:r]`` [r, n], base ``W - scaling B A``. ``Q[:, :r]`` is the QR of the first
``r`` columns of ``W`` and ``R[:r] = Q[:, :r]ᵀ W``, which is what
:func:`dist_lora.parallel.linalg.leading_columns_qr` computes from the shards (``B`` row-sharded and
``A`` replicated for a column-parallel layer; ``A`` column-sharded and ``B`` replicated for a
row-parallel one). Column signs follow a positive diagonal of R (LAPACK's may be negative;
``B A`` is the same).
"""

from __future__ import annotations

import torch

from dist_lora.parallel import linalg


def factors(weight, r: int, scaling: float, niter: int | None, generator: torch.Generator, config):
    """Local ``(lora_A, lora_B, new base shard)`` (float32) of ``weight`` (a ShardedWeight)."""
    try:
        b, a = linalg.leading_columns_qr(weight.local, weight.dim, weight.group, r, weight.col_offset)
    except ValueError as err:
        raise ValueError(f"OLoRA: the first r={r} columns of the weight are linearly dependent; "
                         f"lower r or use another init_lora_weights ({err})") from err
    return a, b, weight.local - scaling * (b @ a)
