"""``into_slots`` against an index-based reference in float64: values and every gradient.

The reference reads each slot's rows with ``index_select``, computes PEFT's arithmetic out of
place (``V + s h B^T + bias``, DoRA ``scale * (V + ...)``, additive terms) and writes the rows
back with ``index_copy``, entry by entry; autograd differentiates it. ``into_slots`` must agree
for per-projection blocks of a fused q/k/v output (several groups), GLU halves (one group), the
whole output, several adapters on one slot, mixed kinds, rank 0, and a bfloat16 base with float32
adapters; and the same under torch.compile (``fullgraph``: the path dynamo traces).
"""

from __future__ import annotations

import pytest
import torch

from dist_lora.layers.placement import Entry, into_slots
from dist_lora.layers.sharding import FactorLayout
from dist_lora.layers.slots import Block, Slot

BLOCKS = {"q": Block(2, 12, 0, 8), "k": Block(2, 12, 8, 2), "v": Block(2, 12, 10, 2),
          "gate": Block(1, 24, 0, 12), "up": Block(1, 24, 12, 12), "all": None}
SLOTS = {key: Slot(key, (key,), 0, FactorLayout(dim=0), block) for key, block in BLOCKS.items()}
WIDTH = 24
CASES = [
    [("q", "lora"), ("k", "dora"), ("v", "delta")],
    [("q", "dora"), ("k", "dora"), ("v", "dora")],        # disjoint scales: one pass in backward
    [("gate", "dora"), ("up", "lora_bias")],
    [("all", "dora"), ("q", "lora")],
    [("q", "dora"), ("all", "lora"), ("q", "dora")],      # several adapters on one slot, in order
    [("all", "dora_bias"), ("all", "delta"), ("all", "dora")],
    [("gate", "lora_bias"), ("all", "vector")],
    [("up", "dora"), ("up", "delta")],
    [("q", "lora_r0"), ("all", "dora_r0")],                # rank 0: an AdaLoRA-shrunk or vacant hotswap slot
]


def _rows(slot: Slot) -> torch.Tensor:
    return torch.arange(WIDTH) if slot.block is None else slot.rows_on(torch.device("cpu"))


def _reference(out: torch.Tensor, entries: list[Entry]) -> torch.Tensor:
    for e in entries:
        rows = _rows(e.slot)
        current = out.index_select(-1, rows)
        if e.delta is not None:
            new = current + e.delta
        else:
            d = e.alpha * e.h @ e.lora_b.t() + (0 if e.bias is None else e.bias)
            new = current + d if e.scale is None else e.scale * (current + d)
        out = out.index_copy(-1, rows, new.to(out.dtype))
    return out


def _entries(case, dtype, g):
    entries, leaves = [], []

    def leaf(*shape, positive=False):
        t = torch.rand(*shape, dtype=dtype, generator=g) + 0.5 if positive else torch.randn(*shape, dtype=dtype, generator=g)
        t.requires_grad_(True)
        leaves.append(t)
        return t

    for key, kind in case:
        slot = SLOTS[key]
        n = len(_rows(slot))
        if kind == "delta":
            entries.append(Entry(slot, delta=leaf(3, 2, n)))
        elif kind == "vector":
            entries.append(Entry(slot, delta=leaf(n)))
        else:
            r = 0 if kind.endswith("_r0") else 4
            e = Entry(slot, h=leaf(3, 2, r), lora_b=leaf(n, r), alpha=0.7)
            if "bias" in kind:
                e.bias = leaf(n)
            if "dora" in kind:
                e.scale = leaf(n, positive=True)
            entries.append(e)
    return entries, leaves


def _compiled(out, entries):
    torch._dynamo.reset()
    return torch.compile(into_slots, backend="eager", fullgraph=True)(out, entries)


@pytest.mark.parametrize("place", [into_slots, _compiled], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(f"{k}:{v}" for k, v in c) for c in CASES])
def test_into_slots_equals_the_index_based_reference(case, place):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, WIDTH, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.randn(3, 2, WIDTH, dtype=torch.float64, generator=g)
    entries, leaves = _entries(case, torch.float64, g)
    ours = place(x * 2, entries)
    theirs = _reference(x * 2, entries)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours_grads = torch.autograd.grad((ours * weights).sum(), [x, *leaves])
    their_grads = torch.autograd.grad((_reference(x * 2, entries) * weights).sum(), [x, *leaves])
    for a, b in zip(ours_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_adapters_on_a_bfloat16_base_round_once():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 2, WIDTH, generator=g).to(torch.bfloat16)
    entries, leaves = _entries([("q", "lora"), ("v", "dora")], torch.float32, g)  # disjoint slots
    ours = into_slots(base.clone().requires_grad_(True) * 1, entries)
    assert ours.dtype == torch.bfloat16
    # PEFT's contract: the adapter term in float32 added to the base, rounded to bfloat16 once
    # (within one bfloat16 step of the float32 result).
    theirs = _reference(base.float(), entries)
    torch.testing.assert_close(ours.float(), theirs, rtol=2 ** -8, atol=1e-6)
    ours.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
