"""Forward pre-hooks that feed each adapted layer's input tokens to its sharded PCA.

A Megatron layer's input is [s, b, h_in] (sequence first). What a rank sees, and how its PCA is
split (see :mod:`dist_lora.eva.svd`):

============================  ======================  =====================  ===================
layer                         local input             row groups (tokens)    feature group
============================  ======================  =====================  ===================
column, no SP                 [s, b, h] replicated    data parallel          none
column, SP                    [s/p, b, h]             TP and data parallel   none
row (input split on features) [s, b, h/p]             data parallel          TP
============================  ======================  =====================  ===================

Per-projection adapters of a fused layer (q/k/v in ``linear_qkv``, gate/up in ``linear_fc1``)
share one input, so one hook serves them all: PEFT finds the same grouping by hashing inputs
and also computes one SVD per group.
"""

from __future__ import annotations

import torch

from dist_lora.eva.svd import ShardedIncrementalPCA
from dist_lora.parallel.collectives import group_rank


class EvaHook:
    """Pre-hook on one wrapped layer. ``mask`` [b, s] (True: use the token) is set per batch."""

    def __init__(self, layer, pca: ShardedIncrementalPCA):
        self.layer, self.pca = layer, pca
        self.mask: torch.Tensor | None = None
        self.active = True
        self.handle = layer.register_forward_pre_hook(self)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's selected rows [n_i, h_local] of the layer input ``x`` [s(/p), b, h(/p)]."""
        shard = self.layer.shard
        mask = self.mask.T  # [s, b]
        if shard.kind == "column" and shard.sequence_parallel and shard.tp > 1:
            mask = mask.chunk(shard.tp)[group_rank(shard.tp_group)]
        if shard.kind == "row" and not shard.input_is_parallel and shard.tp > 1:
            x = x.chunk(shard.tp, dim=-1)[group_rank(shard.tp_group)]
        return x[mask.to(x.device)]  # the batch's mask comes from the host

    @torch.no_grad()
    def __call__(self, module, args):
        if not self.active:
            return
        x = self.tokens(args[0])
        # PEFT skips a step with fewer tokens than components (counted over all ranks here).
        if self.pca.batch_count(x.shape[0]) < self.pca.n_components:
            return
        self.pca.partial_fit(x)

    def remove(self) -> None:
        self.handle.remove()


def token_groups(layer, groups) -> tuple[list, object]:
    """(row groups, feature group) of a wrapped layer's PCA, from the table above."""
    shard = layer.shard
    dp = [groups.dp_group] if groups.dp_size > 1 else []
    tp = shard.tp_group if shard.tp > 1 else None
    if shard.kind == "row":
        return dp, tp
    return dp + ([tp] if shard.sequence_parallel and tp is not None else []), None
