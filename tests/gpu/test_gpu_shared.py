"""Two ranks on ONE GPU. NCCL refuses two ranks on one device, so dist_lora refuses it first, on
every rank, naming the setting; gloo (``backend="gloo"``) lets the ranks share the GPU, and TP=2
then equals PEFT on the same GPU (logits and every adapter gradient)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.parallel.device import local_device
from dist_lora.parallel.launch_env import LOOPBACK, free_port
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny
from tests.gpu.common import DEVICE, MARKS, SCENARIOS, batch, reference

pytestmark = MARKS
TOL = 2e-5  # as tests/gpu/test_gpu_tp1.py
ROOT = Path(__file__).resolve().parents[2]


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    for name in ("lora", "dora"):
        family, config = SCENARIOS[name]
        torch.save(reference(family, dict(config, init_lora_weights=False), torch.float32, steps=1),
                   tmp / f"shared_{name}.pt")
    return {"llama": str(tmp / "llama"), "device": str(DEVICE)}


@check("tp2")
def tp2_with_two_ranks_sharing_one_gpu_over_gloo_equals_peft(ctx):
    assert ctx.groups.backend == "gloo"
    assert local_device() == torch.device(ctx.data["device"])
    for name in ("lora", "dora"):
        ref = torch.load(Path(ctx.tmp) / f"shared_{name}.pt")
        model = models.from_pretrained(ctx.data["llama"])
        dl.apply_lora(model, dl.LoraConfig(**dict(SCENARIOS[name][1], init_lora_weights=False)))
        dl.set_adapter_state_dict(model, ref["state"])
        ids, labels = batch("llama")
        assert rel_error(models.logits(model, ids).cpu(), ref["logits"]) <= TOL, name
        forward_backward(model, ids, labels)
        finalize_grads(model)
        grads = {k: v.float().cpu() for k, v in dl.adapter_state_dict(model, gradients=True).items()}
        worst = max(rel_error(grads[k], ref["grads"][k]) for k in ref["grads"])
        assert worst <= TOL, (name, worst)
        dl.check_replicas(model)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() > 1, reason="needs exactly one GPU")
def test_nccl_with_more_ranks_than_gpus_is_refused_on_every_rank():
    port, procs = free_port(), []
    code = "from dist_lora import parallel; parallel.initialize(tensor_parallel=2)"
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), DIST_LORA_TIMEOUT_S="30",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode != 0, out
        assert "tensor_parallel x pipeline_parallel = 2 x 1 runs 2 rank(s) on this node, but it sees 1 GPU(s)" in out, out


test_gpu_shared = distributed_tests(__name__, world_size=2, prepare=prepare, env={"DIST_LORA_TEST_BACKEND": "gloo"})
