"""Where each projection of a fused Megatron layer sits in a TP rank's output rows."""

from __future__ import annotations

import torch

from dist_lora.models.spec import ModelSpec


def projection_rows(layout: str, spec: ModelSpec, tp: int, device: torch.device) -> dict[int, torch.Tensor]:
    """Per projection index (q, k, v or gate, up), this rank's local output rows of the fused layer,
    as index tensors on ``device`` (the fused weight's: they index its rows and outputs).

    The rows are the same on every TP rank (each rank holds the same pattern for its groups).
    ``qkv``: local rows are ``ng/p`` groups of ``[q heads of the group; k; v] x head_dim``.
    ``glu``: local rows are ``[gate_i; up_i]``.
    """
    if layout == "qkv":
        d, ng = spec.head_dim, spec.num_kv_heads
        per_group = spec.num_heads // ng
        width = (per_group + 2) * d
        starts = torch.arange(ng // tp, device=device) * width
        offsets = [(0, per_group * d), (per_group * d, d), ((per_group + 1) * d, d)]
        return {i: (starts[:, None] + off + torch.arange(n, device=device)).reshape(-1)
                for i, (off, n) in enumerate(offsets)}
    if layout == "glu":
        half = spec.ffn_hidden_size // tp
        return {0: torch.arange(half, device=device), 1: torch.arange(half, 2 * half, device=device)}
    raise ValueError(f"layout {layout!r} is not a fused layout")
