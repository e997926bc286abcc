"""DoRA (weight-decomposed LoRA, https://arxiv.org/abs/2402.09353) arithmetic under TP.

``W' = m * (W + s B A) / ||W + s B A||_row``. The row norm is over input features:

* column-parallel layers hold whole rows, so the norm is local;
* row-parallel layers hold a column slice of every row, so the squared partial norms are
  all-reduced over the TP group (``all_reduce_`` of an [out] vector).

As in the paper (section 4.3) and PEFT, the norm is detached: it gets no gradient. It is
computed and kept in float32 on any base dtype (PEFT computes it in the adapter dtype).
"""

from __future__ import annotations

import torch

from dist_lora.layers.sharding import BaseShard
from dist_lora.parallel.collectives import all_reduce_


@torch.no_grad()
def row_norm(weight_rows: torch.Tensor, delta: torch.Tensor, shard: BaseShard) -> torch.Tensor:
    """``||W + delta||`` per output row, over the *global* input features: [out_local], float32
    whatever the base and adapter dtypes (a bfloat16 norm would put ~0.4% noise on every scale).

    A zero row gets the smallest positive float instead of 0: the vocabulary padding rows of a
    TP-split output layer are zero (weight and B), and ``m / 0`` there made every gradient NaN
    (their output stays zero and is never read)."""
    squares = (weight_rows.float() + delta.float()).pow(2).sum(dim=1)
    if shard.kind == "row":
        all_reduce_(squares, shard.tp_group)
    return squares.sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def dora_output(base_out: torch.Tensor, lora_out: torch.Tensor, magnitude: torch.Tensor,
                norm: torch.Tensor) -> torch.Tensor:
    """Extra output of DoRA on top of the base output (PEFT's ``result_dora``).

    ``base_out``: the base layer's output without its bias, [..., out]; ``lora_out``:
    ``scaling * B(A(x))``, [..., out]; ``magnitude``, ``norm``: [out].
    """
    scale = magnitude / norm
    return (scale - 1) * base_out + scale * lora_out
