"""``train.dtype: bfloat16`` recipes on 2 ranks (TP=2): LoRA, DoRA with and without dropout,
PiSSA and AdaLoRA train (finite, falling loss) and their releases pass peft's verification; the
adapters are float32 by default and bfloat16 with ``train.adapter_dtype: base``. Bad precision
and backend settings are refused before any rank starts, naming the key."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from dist_lora.recipes.config import load_config
from dist_lora.recipes.finetune import check
from tests.recipes.test_adapter_methods import ADALORA, LINEAR
from tests.recipes.test_finetune import DEMO, run_recipe

BF16 = ["train.dtype=bfloat16", "train.steps=12"]


def _trained(rows: list[dict]) -> None:
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and all(math.isfinite(r["grad_norm"]) for r in rows), losses
    assert losses[-1] < losses[0] - 0.05, losses


def _dtypes(path) -> set:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_dora_with_dropout_in_bfloat16_trains_and_verifies(tmp_path):
    """The issue's reproduction: it crashed (fp32 dropped-out input against the bf16 weight)."""
    _trained(run_recipe(tmp_path, "dora_dropout", *BF16, "lora.use_dora=true", "lora.lora_dropout=0.1"))
    assert _dtypes(tmp_path / "dora_dropout" / "adapter") == {torch.float32}


def test_dora_with_bfloat16_adapters_trains_and_verifies(tmp_path):
    _trained(run_recipe(tmp_path, "dora_base", *BF16, "lora.use_dora=true", "train.adapter_dtype=base"))
    assert _dtypes(tmp_path / "dora_base" / "adapter") == {torch.bfloat16}


def test_lora_pissa_and_adalora_in_bfloat16_train_and_verify(tmp_path):
    _trained(run_recipe(tmp_path, "lora", *BF16))
    _trained(run_recipe(tmp_path, "pissa", *BF16, "lora.init_lora_weights=pissa_niter_4", LINEAR))
    rows = run_recipe(tmp_path, "adalora", *BF16, "adalora.tinit=2", "adalora.tfinal=4", "adalora.deltaT=2",
                      config=ADALORA)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"], rows


@pytest.mark.parametrize("overrides,needle", [
    (["train.dtype=float16"], "train.dtype must be float32 or bfloat16, got 'float16' .*loss scaling"),
    (["train.adapter_dtype=bfloat16"], "train.adapter_dtype must be float32 or base"),
    (["parallel.backend=mpi"], "parallel.backend must be nccl, gloo or null"),
])
def test_bad_precision_or_backend_settings_are_named(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(DEMO, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_nccl_requested_without_cuda_is_refused_before_start():
    with pytest.raises(ValueError, match="parallel.backend='nccl' needs CUDA"):
        check(load_config(DEMO, ["parallel.backend=nccl"]))
