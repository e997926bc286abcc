"""AdaLoRA checkpoints on one process (plain Hugging Face model): the config with its learned
rank pattern round-trips through the manifest, and a resumed run repeats the uninterrupted one.

The sharded cases (TP2 x DP2, PP2 x DP2, resharding, wrong checkpoints on every rank) run in
``test_adalora_distributed.py``'s launch.
"""

from __future__ import annotations

import pytest
import torch

from dist_lora import (
    AdaLoraConfig,
    adapter_state_dict,
    apply_adalora,
    load_adapter,
    load_training_state,
    orth_reg_loss,
    save_adapter,
    save_training_state,
    update_and_allocate,
)
from dist_lora.adapters.registry import require_adapter
from dist_lora.checkpoint.sharded import read_manifest
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

CONFIG = dict(init_r=3, target_r=1, lora_alpha=6, tinit=1, tfinal=2, total_step=9, deltaT=2,
              target_modules=["down_proj", "q_proj", "v_proj"])
STEPS = 9


def _fresh(seed: int):
    model = hf_model(TINY_CONFIGS["llama"])
    apply_adalora(model, AdaLoraConfig(**CONFIG), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Lambda starts at zero; random values make the scores non-trivial
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _train(model, optimizer, steps, save_at=(), path=None) -> list:
    ids = torch.randint(0, TINY_CONFIGS["llama"]["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(4))
    out = []
    for step in steps:
        if step in save_at:
            save_training_state(model, optimizer, path / f"k{step}", step=step)
        loss = model(input_ids=ids, labels=ids).loss + orth_reg_loss(model)
        loss.backward()
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
        out.append((loss.item(), require_adapter(model, "default").rank_pattern))
    return out


def test_loading_creates_the_adalora_adapter_with_the_learned_config(tmp_path):
    model, optimizer = _fresh(1)
    _train(model, optimizer, range(5))
    config = require_adapter(model, "default")
    assert config.rank_pattern is not None
    save_adapter(model, tmp_path / "ckpt")
    assert AdaLoraConfig.from_dict(read_manifest(tmp_path / "ckpt")["adapter_config"]) == config
    bare = hf_model(TINY_CONFIGS["llama"])
    load_adapter(bare, tmp_path / "ckpt")
    loaded = require_adapter(bare, "default")
    assert isinstance(loaded, AdaLoraConfig) and loaded == config
    ours, theirs = adapter_state_dict(bare), adapter_state_dict(model)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("k", [0, 4, 8])  # before the allocator, mid-schedule, after the final pattern
def test_resume_is_bit_identical(tmp_path, k):
    model, optimizer = _fresh(1)
    straight = _train(model, optimizer, range(STEPS), save_at=(k,), path=tmp_path)
    final = adapter_state_dict(model)
    model, optimizer = _fresh(2)
    record = load_training_state(model, optimizer, tmp_path / f"k{k}")
    assert _train(model, optimizer, range(record["step"], STEPS)) == straight[k:]
    resumed = adapter_state_dict(model)
    assert all(torch.equal(resumed[n], final[n]) for n in final)
