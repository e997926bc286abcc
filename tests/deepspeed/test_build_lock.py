"""A DeepSpeed engine starts although a killed process left torch's extension build lock behind.

DeepSpeed's communication back-end JIT-loads a shared-memory all-reduce op in every process,
under torch's file lock; a stale lock made every later start wait forever (a CI run lost 30
minutes to it). The seam keeps DeepSpeed from loading that op, so the lock is never taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent("""
    import torch
    from dist_lora import LoraConfig, apply_lora, parallel
    from dist_lora.integrations import deepspeed as ds
    from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

    parallel.initialize()
    model = hf_model(TINY_CONFIGS["llama"]).train()
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = ds.initialize(model, optimizer, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                                              "zero_allow_untested_optimizer": True})
    logits = engine(torch.tensor([[1, 2, 3]])).logits
    engine.backward(logits.square().mean())
    engine.step()
    print("STEPPED")
    parallel.shutdown()
""")


def test_a_stale_extension_build_lock_does_not_hang_deepspeed(tmp_path):
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), DS_ACCELERATOR="cpu", LOCAL_RANK="0")
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"DeepSpeed start-up waited on the stale lock {lock}: {(exc.stderr or b'')[-2000:]!r}")
    assert out.returncode == 0 and "STEPPED" in out.stdout, out.stderr[-3000:]
    assert lock.exists(), "the lock was taken and released: DeepSpeed still loads its shared-memory op"
