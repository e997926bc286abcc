"""HF <-> Megatron shard layouts: every rank's slice read, then unsharded, gives the original back,
and the fused q/k/v and gate/up orders are Megatron's."""

from __future__ import annotations

import pytest
import torch

from dist_lora.models.layouts import LAYOUTS, ExpertSlice, read_local, unshard
from dist_lora.models.spec import spec_from_config
from dist_lora.testing.tiny import TINY_CONFIGS


class DictReader:
    def __init__(self, tensors):
        self.tensors, self.bytes_read = tensors, 0

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, rows=None, cols=None, expert=None):
        t = self.tensors[name]
        t = t[expert] if expert is not None else t
        t = t[slice(*rows)] if rows else t
        t = t[:, slice(*cols)] if cols else t
        self.bytes_read += t.numel() * t.element_size()
        return t.clone()


SPEC = spec_from_config(TINY_CONFIGS["llama"])  # 8 heads, 4 kv heads, head_dim 8, ffn 96, vocab 101
D, H = SPEC.head_dim, SPEC.hidden_size
CASES = {
    "replicated": {"n": torch.randn(H)},
    "column": {"w": torch.randn(96, H)},
    "row": {"w": torch.randn(H, 96)},
    "vocab": {"w": torch.randn(SPEC.vocab_size, H)},
    "qkv": {"q": torch.randn(8 * D, H), "k": torch.randn(4 * D, H), "v": torch.randn(4 * D, H)},
    "glu": {"g": torch.randn(96, H), "u": torch.randn(96, H)},
    "gate_up": {"gu": torch.randn(2 * 96, H)},
}


def test_every_layout_is_tested():
    assert set(CASES) == set(LAYOUTS)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("layout", sorted(CASES))
def test_read_then_unshard_is_identity(layout, tp):
    tensors = CASES[layout]
    reader = DictReader(tensors)
    shards = [read_local(layout, reader, list(tensors), SPEC, tp, r) for r in range(tp)]
    for name, back in zip(tensors, unshard(layout, shards, SPEC)):
        assert torch.equal(back, tensors[name]), (layout, tp, name)
    if layout not in ("replicated",):
        full = sum(t.numel() * t.element_size() for t in tensors.values())
        assert reader.bytes_read == full, "each element must be read by exactly one rank"


def test_qkv_shard_is_grouped_q_k_v():
    q, k, v = (CASES["qkv"][n] for n in "qkv")
    shard = read_local("qkv", DictReader(CASES["qkv"]), ["q", "k", "v"], SPEC, 2, 1)
    # TP rank 1 of 2 owns kv groups 2 and 3; each group is 2 query heads, then k, then v.
    expected = torch.cat([torch.cat([q[g * 2 * D:(g + 1) * 2 * D], k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]])
                          for g in (2, 3)])
    assert torch.equal(shard, expected)


def test_glu_shard_is_gate_then_up_of_the_rank():
    g, u = CASES["glu"]["g"], CASES["glu"]["u"]
    shard = read_local("glu", DictReader(CASES["glu"]), ["g", "u"], SPEC, 2, 1)
    assert torch.equal(shard, torch.cat([g[48:], u[48:]]))


def test_gate_up_shard_is_gate_then_up_of_the_rank():
    gu = CASES["gate_up"]["gu"]
    shard = read_local("gate_up", DictReader(CASES["gate_up"]), ["gu"], SPEC, 2, 1)
    assert torch.equal(shard, torch.cat([gu[48:96], gu[96 + 48:]]))
    # the same rows as two separate gate / up tensors
    glu = read_local("glu", DictReader({"g": gu[:96], "u": gu[96:]}), ["g", "u"], SPEC, 2, 1)
    assert torch.equal(shard, glu)


def test_expert_slice_reads_one_expert_of_fused_experts():
    fused = torch.randn(4, 2 * 96, H)  # [E, 2f, h], like mlp.experts.gate_up_proj
    reader = ExpertSlice(DictReader({"gate_up_proj": fused}), expert=2)
    assert reader.shape("gate_up_proj") == (2 * 96, H)
    shard = read_local("gate_up", reader, ["gate_up_proj"], SPEC, 2, 0)
    assert torch.equal(shard, torch.cat([fused[2, :48], fused[2, 96:96 + 48]]))


def test_vocab_padding_rows_are_zero():
    shard = read_local("vocab", DictReader(CASES["vocab"]), ["w"], SPEC, 4, 3)  # 101 -> 104 rows
    assert shard.shape == (26, H)
    assert torch.equal(shard[:23], CASES["vocab"]["w"][78:])
    assert not shard[23:].any()
