"""LoRA on embeddings: Megatron ``VocabParallelEmbedding`` and plain ``torch.nn.Embedding``.

PEFT's embedding LoRA: ``y = E[ids] + s * (A^T[ids]) B^T`` with ``lora_embedding_A`` [r, V] and
``lora_embedding_B`` [h, r] (https://arxiv.org/abs/2106.09685).

**Vocab-parallel** (E split on the vocabulary: rank i holds rows ``[start_i, end_i)``). ``A_i``
[r, V/p] is split like E (padding columns stay zero), ``B`` [h, r] is replicated. The wrapper runs
the base's steps itself (Megatron-Core's ``VocabParallelEmbedding.forward``): each rank looks up
the ids it owns in E_i and A_i (zero elsewhere), adds its partial ``s * A_i^T[ids] B^T`` into its
partial lookup [b, s, h], and the sum goes through the base's own reduction (``reduce_from_group``,
or the transposed reduce-scatter to [s/p, b, h] when the base reduce-scatters its output for
sequence parallelism): no collective of its own. B's gradient is then a partial sum over TP,
summed once per step by ``finalize_grads``. Merge: ``E_i += s * (B A_i)^T`` on the local rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.factors import LoraFactors
from dist_lora.layers.placement import Entry, into_slots
from dist_lora.parallel.collectives import reduce_from_group, reduce_scatter_first_dim


class LoraEmbedding(AdapterLayer):
    """Adapters on a vocab-parallel or plain embedding (see module docstring)."""

    def forward(self, ids: torch.Tensor, *args, **kwargs):
        live = list(self.live())
        if not live:
            return self.base_layer(ids, *args, **kwargs)
        if self.shard.megatron and self.shard.tp > 1:
            return self._vocab_parallel_forward(ids, [factors for _, factors in live])
        out = self.base_layer(ids, *args, **kwargs)
        delta = None
        for _, factors in live:
            d = (self._lookup(ids, factors) @ factors.lora_B.t()) * factors.scaling
            delta = d if delta is None else delta + d
        return (out + delta).to(out.dtype)  # mixed precision: rounded to the base dtype once (as PEFT)

    def _vocab_parallel_forward(self, ids: torch.Tensor, live: list[LoraFactors]) -> torch.Tensor:
        """The base's masked lookup with the adapters' partial products added, then its reduction."""
        base, group = self.base_layer, self.shard.tp_group
        outside = (ids < base.vocab_start_index) | (ids >= base.vocab_end_index)
        local = (ids - base.vocab_start_index).masked_fill(outside, 0)
        part = base.weight[local] if getattr(base, "deterministic_mode", False) else F.embedding(local, base.weight)
        part.masked_fill_(outside.unsqueeze(-1), 0.0)
        entries = []
        for f in live:
            h, alpha = f.scale_hidden(F.embedding(local, f.lora_A.t()).masked_fill(outside.unsqueeze(-1), 0.0))
            entries.append(Entry(f.slot, h=h, lora_b=f.lora_B, alpha=alpha))
        part = into_slots(part, entries)
        if base.reduce_scatter_embeddings:  # [b, s, h] -> [s/p, b, h]
            return reduce_scatter_first_dim(part.transpose(0, 1).contiguous(), group)
        return reduce_from_group(part, group)

    def _lookup(self, ids: torch.Tensor, factors: LoraFactors) -> torch.Tensor:
        """``A^T[ids]`` [b, s, r] on an unsharded embedding."""
        base, table = self.base_layer, factors.lora_A.t()
        if self.shard.megatron:
            return F.embedding(ids, table)
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    @torch.no_grad()
    def merge_candidates(self, adapter: str):
        return [(f, self.base_weight() + self._delta_in_weight_layout(f), None)
                for f in self.lora[adapter].values()]

    def _delta_in_weight_layout(self, factors: LoraFactors) -> torch.Tensor:
        return factors.delta_weight().t()
