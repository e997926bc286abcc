"""Merged release (``dist-lora merge``) against PEFT's ``merge_and_unload``, loaded by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import dist_lora as dl
from dist_lora.checkpoint.merge_release import merge_release
from dist_lora.cli import main
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

CASES = {
    "lora_patterns_embedding_saved_head": dict(r=4, lora_alpha=8, use_rslora=True,
                                               target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                               rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                                               modules_to_save=["lm_head"]),
    "dora_all_linear": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "llama"
    save_tiny(TINY_CONFIGS["llama"], path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_release_equals_peft_merge_and_unload(base, tmp_path, name):
    reference = peft_model("llama", dict(CASES[name], init_lora_weights=False))
    reference.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.merge_and_unload()(ids).logits
    merge_release(base, tmp_path / "adapter", tmp_path / "merged", max_shard_size=60_000, progress=False)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file(), "small shards need an index"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_error(merged(ids).logits, expected) <= 1e-5


def test_merge_from_a_sharded_checkpoint_and_the_cli(base, tmp_path, capsys):
    model = hf_model(TINY_CONFIGS["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True, init_lora_weights=False))
    dl.save_adapter(model, tmp_path / "ckpt")
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_error(merged(ids).logits, expected) <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("targets", [dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                     dict(target_modules=["lm_head", "embed_tokens"])])
def test_a_tied_base_is_released_untied_with_the_trained_logits(tmp_path, targets):
    """A saved head (which PEFT's merge unties too) or LoRA on the tied head / embedding (which
    PEFT would fold into the one shared weight): the release has its own lm_head."""
    save_tiny(TINY_CONFIGS["qwen2"], tmp_path / "qwen")
    reference = peft_model("qwen2", dict(targets, r=4, lora_alpha=8, init_lora_weights=False))
    if "modules_to_save" in targets:
        with torch.no_grad():
            reference.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)  # a trained head
    reference.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    merge_release(tmp_path / "qwen", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_error(merged(ids).logits, expected) <= 1e-5
