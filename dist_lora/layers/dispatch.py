"""Base-layer types -> (wrapper class, ``BaseShard``): one ordered first-match list.

Megatron-Core types come first (they are not ``nn.Linear`` subclasses, but a future one might
be); plain ``torch.nn`` layers are unsharded (TP = 1). The linear layers of routed experts
(``is_expert``: split over their expert-tensor-parallel group, their data moved by the MoE token
dispatcher) have a table of their own.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from dist_lora.integrations.megatron import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from dist_lora.layers.embedding import LoraEmbedding
from dist_lora.layers.expert_linear import ExpertLoraLinear
from dist_lora.layers.linear import LoraLinear
from dist_lora.layers.quantized import QuantizedLinear
from dist_lora.layers.sharding import BaseShard
from dist_lora.parallel.collectives import group_rank, group_size


def _column(layer, vocab_size):
    if layer.gather_output:
        raise ValueError("LoRA on a ColumnParallelLinear with gather_output=True is not supported")
    g = layer.tp_group
    return BaseShard("column", g, group_size(g), group_rank(g), layer.input_size, layer.output_size,
                     sequence_parallel=layer.sequence_parallel, megatron=True)


def _row(layer, vocab_size):
    g = layer.tp_group
    return BaseShard("row", g, group_size(g), group_rank(g), layer.input_size, layer.output_size,
                     sequence_parallel=layer.sequence_parallel, megatron=True,
                     input_is_parallel=layer.input_is_parallel)


def _expert(kind: str):
    def make(layer, vocab_size):
        g = layer.tp_group  # the expert-tensor-parallel group
        return BaseShard(kind, g, group_size(g), group_rank(g), layer.input_size, layer.output_size, megatron=True)
    return make


def _vocab(layer, vocab_size):
    g = layer.tp_group
    return BaseShard("embedding", g, group_size(g), group_rank(g), vocab_size or layer.num_embeddings,
                     layer.embedding_dim, sequence_parallel=layer.reduce_scatter_embeddings, megatron=True,
                     vocab_start=layer.vocab_start_index, padded_vocab=layer.num_embeddings)


def _linear(layer, vocab_size):
    return BaseShard("column", None, 1, 0, layer.in_features, layer.out_features)


def _embedding(layer, vocab_size):
    return BaseShard("embedding", None, 1, 0, layer.num_embeddings, layer.embedding_dim,
                     padded_vocab=layer.num_embeddings)


def _quantized(layer, vocab_size):
    return layer.shard


# Base-layer type, wrapper class, shard description: the first match wins.
DISPATCH: list[tuple[type, type, Callable]] = [
    (QuantizedLinear, LoraLinear, _quantized),
    (ColumnParallelLinear, LoraLinear, _column),
    (RowParallelLinear, LoraLinear, _row),
    (VocabParallelEmbedding, LoraEmbedding, _vocab),
    (nn.Linear, LoraLinear, _linear),
    (nn.Embedding, LoraEmbedding, _embedding),
]


# The linear layers of routed experts (``is_expert``), first match wins.
EXPERT_DISPATCH: list[tuple[type, type, Callable]] = [
    (ColumnParallelLinear, ExpertLoraLinear, _expert("column")),
    (RowParallelLinear, ExpertLoraLinear, _expert("row")),
]


def describe(layer: nn.Module, vocab_size: int | None = None) -> tuple[type, BaseShard]:
    """The wrapper class and shard description of ``layer`` (first match wins)."""
    table = EXPERT_DISPATCH if getattr(layer, "is_expert", False) else DISPATCH
    for base_type, wrapper, make in table:
        if isinstance(layer, base_type):
            return wrapper, make(layer, vocab_size)
    supported = ", ".join(t.__name__ for t, _, _ in DISPATCH)
    raise TypeError(f"cannot adapt a {type(layer).__name__}; supported layer types: {supported}")
