"""The DeepSpeed recipe end to end on 2 ranks: ZeRO-3 with a 4-bit base (QLoRA) trains (the loss
falls), exports a PEFT adapter that peft verifies on the dequantised base, and resumes from a
DeepSpeed checkpoint with bit-identical losses (the interrupted run under mpiexec, which sets no
LOCAL_RANK, where MPI is installed); bad ZeRO JSONs are rejected before any rank starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes.test_finetune import ROOT, TORCHRUN, run_recipe

pytest.importorskip("deepspeed")
DEMO = ROOT / "configs" / "demo_deepspeed.yaml"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _run(tmp_path, name, *overrides, resume=False, launcher=TORCHRUN):
    return run_recipe(tmp_path, name, *overrides, resume=resume, env=ENV, script="finetune_deepspeed.py", config=DEMO,
                      launcher=launcher)


def test_zero3_qlora_demo_trains_exports_verifies_and_resumes(tmp_path):
    straight = _run(tmp_path, "straight", "train.steps=40", "checkpoint.every=20")
    first, last = straight[:5], straight[-5:]
    assert sum(r["loss"] for r in last) / 5 < sum(r["loss"] for r in first) / 5 - 0.5, [r["loss"] for r in straight]
    assert (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").is_file()
    mpi = [str(MPIEXEC), "-n", "2", sys.executable] if MPIEXEC.exists() else TORCHRUN
    _run(tmp_path, "resumed", "train.steps=40", "train.stop_at=20", "checkpoint.every=20", launcher=mpi)
    resumed = _run(tmp_path, "resumed", "train.steps=40", "checkpoint.every=20", resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


@pytest.mark.parametrize("zero,needle", [
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 64}, "sets train_batch_size; remove it"),
    ({"gradient_clipping": 5.0}, "sets gradient_clipping=5.0, but the recipe says 1.0"),
    ({"optimizer": {"type": "Adam"}}, "defines an optimizer/scheduler"),
])
def test_bad_zero_json_is_rejected_before_any_rank_starts(tmp_path, zero, needle):
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(zero))
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune_deepspeed.py"), "--config", str(DEMO),
                          f"deepspeed.config={path}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]


def test_the_megatron_launcher_refuses_a_deepspeed_recipe():
    from dist_lora.recipes.config import load_config
    from dist_lora.recipes.finetune import run

    with pytest.raises(ValueError, match="launch/finetune_deepspeed.py"):
        run(load_config(DEMO))
