"""Where each projection of a fused Megatron layer sits in a TP rank's output rows."""

from __future__ import annotations

from dist_lora.layers.slots import Block
from dist_lora.models.spec import ModelSpec


def projection_blocks(layout: str, spec: ModelSpec, tp: int) -> dict[int, Block]:
    """Per projection index (q, k, v or gate, up), this rank's local output rows of the fused layer
    as a :class:`Block` (the same on every TP rank: each rank holds the same pattern for its groups).

    ``qkv``: local rows are ``ng/p`` groups of ``[q heads of the group; k; v] x head_dim``.
    ``glu``: local rows are ``[gate_i; up_i]``.
    """
    if layout == "qkv":
        d, ng = spec.head_dim, spec.num_kv_heads
        per_group = spec.num_heads // ng
        period = (per_group + 2) * d
        offsets = [(0, per_group * d), (per_group * d, d), ((per_group + 1) * d, d)]
        return {i: Block(ng // tp, period, off, n) for i, (off, n) in enumerate(offsets)}
    if layout == "glu":
        half = spec.ffn_hidden_size // tp
        return {0: Block(1, 2 * half, 0, half), 1: Block(1, 2 * half, half, half)}
    raise ValueError(f"layout {layout!r} is not a fused layout")

