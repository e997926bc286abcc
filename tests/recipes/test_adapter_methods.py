"""Every adapter method a recipe can name, end to end on 2 ranks: PiSSA (released converted to the
original base), EVA (initialised from the training data, resumed bit-identically), LoftQ on a
4-bit base, and AdaLoRA (one global budget, both PEFT releases). Each release is verified by
peft on the model directory it is released for; recipes that cannot be released correctly are
rejected before any rank starts."""

from __future__ import annotations

import json

import pytest

from dist_lora.recipes import adapter
from dist_lora.recipes.config import load_config
from tests.recipes.test_finetune import DEMO, ROOT, run_recipe

LINEAR = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
ADALORA = ROOT / "configs" / "demo_adalora.yaml"


def _adapter_config(tmp_path, name, folder="adapter"):
    return json.loads((tmp_path / name / folder / "adapter_config.json").read_text())


def test_pissa_is_released_as_plain_lora_on_the_original_base(tmp_path):
    # verification loads the original demo base: without the conversion the logits would differ
    run_recipe(tmp_path, "pissa", "train.steps=8", "lora.init_lora_weights=pissa_niter_4", LINEAR)
    saved = _adapter_config(tmp_path, "pissa")
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (32, 64, True)
    assert (tmp_path / "pissa" / adapter.INITIAL / "adapter_model.safetensors").is_file()


def test_eva_recipe_redistributes_ranks_and_resumes_bit_identically(tmp_path):
    eva = ["train.steps=12", "checkpoint.every=6", "lora.init_lora_weights=eva", LINEAR]
    straight = run_recipe(tmp_path, "straight", *eva)
    assert _adapter_config(tmp_path, "straight")["rank_pattern"], "EVA's default rho=2 redistributes ranks"
    run_recipe(tmp_path, "resumed", *eva, "train.stop_at=6")
    resumed = run_recipe(tmp_path, "resumed", *eva, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_loftq_recipe_trains_on_the_nf4_base_it_initialised_for(tmp_path):
    # TP=1 x DP=2 and a 256-wide MLP: LoftQ's 64-value nf4 blocks must be whole rows of every weight
    config = json.loads((ROOT / "configs" / "tiny_llama.json").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    run_recipe(tmp_path, "loftq", "train.steps=6", f"model.demo_config={tmp_path / 'tiny.json'}",
               "parallel.tensor_parallel=1", "model.quantize=nf4", "lora.init_lora_weights=loftq",
               "lora.loftq_config={loftq_bits: 4, loftq_iter: 1}", LINEAR)


def test_adalora_recipe_prunes_to_the_global_budget_releases_both_formats_and_resumes(tmp_path):
    schedule = ["train.steps=24", "checkpoint.every=10", "adalora.tinit=4", "adalora.tfinal=6", "adalora.deltaT=2"]
    rows = run_recipe(tmp_path, "adalora", *schedule, config=ADALORA)
    assert len(rows) == 24
    # stopped mid-schedule (step 10 of the 4..18 budget decrease): the allocator's EMAs are restored
    run_recipe(tmp_path, "resumed", *schedule, "train.stop_at=10", config=ADALORA)
    resumed = run_recipe(tmp_path, "resumed", *schedule, resume=True, config=ADALORA)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    lora = _adapter_config(tmp_path, "adalora", "adapter_lora")
    ranks = list(lora["rank_pattern"].values())
    modules = 4 * 7 + 1
    assert sum(ranks) <= 4 * modules and max(ranks) > 4, ranks  # the budget, spent unevenly
    assert _adapter_config(tmp_path, "adalora")["peft_type"] == "ADALORA"


@pytest.mark.parametrize("overrides,runner,needle", [
    (["adalora.init_r=8"], "megatron", "both a lora and an adalora section"),
    (["lora=null", "adalora.init_r=4", "adalora.target_r=8"], "megatron", "config section adalora: target_r"),
    (["lora=null", "adalora.total_step=500"], "megatron", "adalora.total_step=500 is beyond train.steps=150"),
    (["lora=null", "adalora.init_r=8", "parallel.tensor_parallel=1", "deepspeed.config=configs/deepspeed/zero2.json"],
     "deepspeed", "adalora is trained by launch/finetune.py only"),
    (["lora.init_lora_weights=pissa", "model.quantize=nf4"], "megatron", "released converted to the original float base"),
    (["lora.init_lora_weights=loftq", "lora.loftq_config={loftq_bits: 4}"], "megatron", "set model.quantize: nf4"),
    (["lora.init_lora_weights=loftq", "lora.loftq_config={loftq_bits: 4, loftq_iter: 2}", "model.quantize=nf4"],
     "megatron", "use loftq_iter: 1"),
    (["lora.init_lora_weights=eva", "parallel.tensor_parallel=1", "deepspeed.config=configs/deepspeed/zero2.json"],
     "deepspeed", "eva.* is supported by launch/finetune.py"),
])
def test_adapter_methods_that_cannot_be_released_are_refused_before_start(overrides, runner, needle):
    with pytest.raises(ValueError, match=needle):
        adapter.check(load_config(DEMO, overrides), runner)


def test_bad_input_found_after_start_ends_every_rank_with_one_message(tmp_path):
    """LoftQ at TP=2 on the demo: o_proj's 32-column shards are not whole nf4 blocks, which only
    the model can tell; every rank stops together and rank 0 says why once (no traceback, no hang)."""
    import subprocess

    from tests.recipes.test_finetune import TORCHRUN

    out = tmp_path / "bad"
    result = subprocess.run([*TORCHRUN, str(ROOT / "launch" / "finetune.py"), "--config", str(DEMO),
                             f"output.dir={out}", f"checkpoint.dir={out / 'checkpoints'}", "model.quantize=nf4",
                             "lora.init_lora_weights=loftq", "lora.loftq_config={loftq_bits: 4}", LINEAR],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.count("finetune: error: adding adapter 'default' failed on 2 rank(s)") == 1, result.stderr
    assert "o_proj has 32 input features per tensor-parallel rank" in result.stderr
    assert not (out / "checkpoints" / "latest").exists()
