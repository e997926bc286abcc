"""The fine-tuning recipe end to end on 2 ranks (TP=2): the loss falls, the PEFT export passes
verification against peft, and a resumed run continues with bit-identical losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_lora.recipes.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.mark.parametrize("overrides,needle", [
    (["train.lrr=0.1"], "unknown config key train.lrr; known keys here: .*lr"),
    (["train.lr=fast"], "config key train.lr must be float, got 'fast'"),
    (["parallel.tensor_parallel=2.5"], "config key parallel.tensor_parallel must be int"),
    (["model.hf_dir=/somewhere"], "exactly one of model.hf_dir and model.demo_config"),
    (["lora.r=0"], "config section lora: r must be a positive integer"),
    (["data.format=csv"], "data.format must be one of text, jsonl, chat, completion"),
    (["data.packing=true"], "data.packing needs data.format chat or completion"),
    (["steps=3"], "unknown config key steps"),
    (["train.steps"], "must look like section.key=value"),
    (["parallel.tensor_parallel=3"], "tensor_parallel=3 does not divide num_attention_heads=8; valid tensor_parallel "
                                     "sizes for this model: 1, 2, 4"),
    (["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2", "parallel.first_stage_layers=4"],
     "parallel section does not fit .*tiny_llama.json: first_stage_layers=4 leaves 0 layer.* valid "
     "first_stage_layers values here: 1, 2, 3"),
    (["parallel.first_stage_layers=1"], "first_stage_layers / last_stage_layers need pipeline_parallel > 1"),
])
def test_bad_configs_are_rejected_with_the_key_named(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(DEMO, overrides)


def test_pipeline_stage_layers_are_recipe_keys():
    config = load_config(DEMO, ["parallel.pipeline_parallel=2", "parallel.last_stage_layers=1"])
    assert (config.parallel.first_stage_layers, config.parallel.last_stage_layers) == (None, 1)


def test_the_launcher_rejects_a_bad_config_before_starting_ranks(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), "--config", str(DEMO), "train.lrr=1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "unknown config key train.lrr" in out.stderr


TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]


def run_recipe(tmp_path: Path, name: str, *overrides: str, resume: bool = False, launcher=TORCHRUN,
               env: dict | None = None, script: str = "finetune.py", config: Path = DEMO) -> list[dict]:
    """Run a recipe in ``tmp_path / name``; its training metrics rows (asserts success and
    verification; the validation rows are in :func:`validation_rows`)."""
    out = tmp_path / name
    cmd = [*launcher, str(ROOT / "launch" / script), "--config", str(config), f"output.dir={out}",
           f"checkpoint.dir={out / 'checkpoints'}", *overrides] + (["--resume"] if resume else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if not any(o.startswith("train.stop_at") for o in overrides):
        assert "peft verification OK" in result.stdout, result.stdout[-2000:]
    return [row for row in validation_rows(tmp_path, name, all_rows=True) if "loss" in row]


def validation_rows(tmp_path: Path, name: str, all_rows: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows if all_rows else [row for row in rows if "val_loss" in row]


def test_demo_loss_falls_exports_verifies_and_resumes_bit_identically(tmp_path):
    straight = run_recipe(tmp_path, "straight", "train.steps=60", "checkpoint.every=30")
    first, last = straight[:5], straight[-10:]
    assert sum(r["loss"] for r in last) / 10 < sum(r["loss"] for r in first) / 5 - 1.0, [r["loss"] for r in straight]
    out = tmp_path / "straight"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step-000060"

    run_recipe(tmp_path, "resumed", "train.steps=60", "train.stop_at=30", "checkpoint.every=30")
    resumed = run_recipe(tmp_path, "resumed", "train.steps=60", "checkpoint.every=30", resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 61))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    val = validation_rows(tmp_path, "straight")  # held-out windows: before training and at the end of a run
    assert [r["step"] for r in val] == [0, 60] and val[1]["val_loss"] < val[0]["val_loss"] - 1.0
    assert [r["step"] for r in validation_rows(tmp_path, "resumed")] == [0, 30, 60]


def test_mpiexec_gives_the_losses_of_torchrun(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec: install the 'mpi' extra")
    pytest.importorskip("mpi4py")
    torchrun = run_recipe(tmp_path, "torchrun", "train.steps=8")
    mpi = run_recipe(tmp_path, "mpi", "train.steps=8", launcher=[str(mpiexec), "-n", "2", sys.executable])
    assert [r["loss"] for r in mpi] == [r["loss"] for r in torchrun]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_recipe_is_valid_and_starts_with_its_command(path):
    load_config(path)
    assert path.read_text().startswith("# "), "a recipe's first line is the command that runs it"


def test_slurm_srun_gives_the_losses_of_torchrun(tmp_path):
    """A real one-node Slurm (slurm-wlm + munge on loopback, started here and stopped after)."""

    from dist_lora.testing.slurm import LoopbackSlurm, available

    reason = available()
    if reason:
        pytest.skip(reason)
    torchrun = run_recipe(tmp_path, "torchrun", "train.steps=8")
    with LoopbackSlurm(tmp_path / "slurm") as slurm:
        env = dict(slurm.env, OMP_NUM_THREADS="1")  # as torchrun sets it: same float reductions
        for name in [k for k in env if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))]:
            del env[name]
        srun = run_recipe(tmp_path, "srun", "train.steps=8", launcher=["srun", "-n2", sys.executable], env=env)
    assert [r["loss"] for r in srun] == [r["loss"] for r in torchrun]


def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes(tmp_path):
    """SIGKILL one rank mid-training: the job exits (no hang) naming the failure, and the last
    checkpoint is intact: --resume continues from it."""
    import os
    import signal
    import time

    import psutil

    out = tmp_path / "killed"
    overrides = ["train.steps=400", "checkpoint.every=10", f"output.dir={out}", f"checkpoint.dir={out / 'checkpoints'}"]
    job = subprocess.Popen([*TORCHRUN, str(ROOT / "launch" / "finetune.py"), "--config", str(DEMO), *overrides],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and latest.read_text() >= "step-000020"):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before step 20"
        time.sleep(0.2)
    workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "finetune.py" in " ".join(p.cmdline())]
    os.kill(workers[-1].pid, signal.SIGKILL)
    started = time.monotonic()
    log, _ = job.communicate(timeout=180)
    assert job.returncode != 0 and time.monotonic() - started < 120
    assert "finetune.py FAILED" in log or "Signal 9" in log or "SIGKILL" in log, log[-2000:]
    saved = int(latest.read_text().split("-")[1])
    assert saved >= 20
    resumed = run_recipe(tmp_path, "killed", "train.steps=400", f"train.stop_at={saved + 5}", "checkpoint.every=10",
                   resume=True)
    assert [r["step"] for r in resumed] == list(range(1, saved + 6)), "metrics: the checkpoint's steps, then the new"


def test_megatron_qlora_recipe_verifies_against_peft_on_the_dequantised_base(tmp_path):
    # TP=1 x DP=2: the demo's TP=2 down_proj shards have rows of 80, not a whole number of blocks
    rows = run_recipe(tmp_path, "qlora", "train.steps=6", "parallel.tensor_parallel=1", "model.quantize=nf4",
                      "model.quantize_blocksize=32")
    assert len(rows) == 6
