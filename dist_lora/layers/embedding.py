"""LoRA on embeddings: Megatron ``VocabParallelEmbedding`` and plain ``torch.nn.Embedding``.

PEFT's embedding LoRA: ``y = E[ids] + s * (A^T[ids]) B^T`` with ``lora_embedding_A`` [r, V] and
``lora_embedding_B`` [h, r] (https://arxiv.org/abs/2106.09685).

**Vocab-parallel** (E split on the vocabulary: rank i holds rows ``[start_i, end_i)``). ``A_i``
[r, V/p] is split like E (padding columns stay zero), ``B`` [h, r] is replicated. Each rank looks
up the ids it owns (zero elsewhere); the partial [b, s, r] rows are summed with
``reduce_from_group``, or reduce-scattered to [s/p, b, r] when the base reduce-scatters its
output for sequence parallelism (then B's gradient is summed over sequence shards with
``copy_to_group``). Merge: ``E_i += s * (B A_i)^T`` on the local rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.parallel.collectives import copy_to_group, reduce_from_group, reduce_scatter_first_dim


class LoraEmbedding(AdapterLayer):
    """Adapters on a vocab-parallel or plain embedding (see module docstring)."""

    def forward(self, ids: torch.Tensor, *args, **kwargs):
        out = self.base_layer(ids, *args, **kwargs)
        live = list(self.live())
        if not live:
            return out
        delta = None
        for _, factors in live:
            d = self._delta(ids, factors)
            delta = d if delta is None else delta + d
        return (out + delta).to(out.dtype)  # mixed precision: rounded to the base dtype once (as PEFT)

    def _lookup(self, ids: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
        """This rank's partial ``A^T[ids]`` [b, s, r] (zero for ids owned by other ranks)."""
        base, shard = self.base_layer, self.shard
        table = factors.lora_A.t()
        if shard.megatron:
            if shard.tp == 1:
                return F.embedding(ids, table)
            local = ids - shard.vocab_start
            outside = (local < 0) | (local >= table.shape[0])
            part = F.embedding(local.masked_fill(outside, 0), table)
            return part.masked_fill(outside.unsqueeze(-1), 0.0)
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def _delta(self, ids: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
        group = self.shard.tp_group
        part = self._lookup(ids, factors)
        lora_b = factors.lora_B
        if self.shard.sequence_parallel:
            hidden = reduce_scatter_first_dim(part.transpose(0, 1).contiguous(), group)
            lora_b = copy_to_group(lora_b, group)
        else:
            hidden = reduce_from_group(part, group)
        return (hidden @ lora_b.t()) * factors.scaling

    @torch.no_grad()
    def merge_candidates(self, adapter: str):
        return [(f, self.base_weight() + self._delta_in_weight_layout(f), None)
                for f in self.lora[adapter].values()]

    def _delta_in_weight_layout(self, factors: LoraFactors) -> torch.Tensor:
        return factors.delta_weight().t()
