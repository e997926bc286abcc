"""The device seam, dynamically, on a real sharded workload (TP2, TP2 + SP, PP2).

On a CPU-only machine a tensor created on an implicit device still lands on the right device,
so nothing fails; on a GPU it meets CUDA tensors and crashes (or, worse, a flag or count moves
to the CPU for a collective NCCL cannot do there). :class:`ExplicitDeviceMode` records every
factory call that dist_lora code makes without naming a device while the workload runs: load,
adapters on fused layers with DoRA and dropout, a PiSSA adapter from a randomised SVD, forward,
backward, gradient finalisation and clipping, logits, checkpoint save / load and PEFT export,
weighted combinations (TIES with the SVD clamp, DARE), AdaLoRA (penalty, allocation, export) and
EVA. The hot spots of the original audit (the error flag of ``any_rank``, the slot rows of fused
layers) are then planted back as they were, to show that the check catches them.
"""

from __future__ import annotations

from pathlib import Path

import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.models.training import clip_grad_norm, finalize_grads, forward_backward
from dist_lora.parallel import agreement
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.device_seam import PACKAGE, ExplicitDeviceMode
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The code of main before the device seam, compiled under the modules' own file names.
OLD_ANY_RANK = """
def any_rank(flag, group=None):
    if group_size(group) == 1:
        return bool(flag)
    box = torch.tensor([int(bool(flag))], dtype=torch.int32)
    return bool(all_reduce_(box, group, "max").item())
"""
OLD_BLOCK_ROWS = """
def rows(self, device=None):
    starts = torch.arange(self.groups) * self.period + self.offset
    return (starts[:, None] + torch.arange(self.width)).reshape(-1)
"""


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    return {"llama": str(tmp / "llama")}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_CONFIGS["llama"]["vocab_size"], (2, 8), generator=g)


def _train(model, steps: int = 1, after=None) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = _batch()
    for step in range(steps):
        forward_backward(model, ids, ids.roll(-1, 1), num_microbatches=1)
        finalize_grads(model)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        if after is not None:
            after(model, step)
        optimizer.zero_grad()


def _workload(ctx) -> None:
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=0.1))
    dl.add_adapter(model, dl.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa_niter_2"),
                   "pissa")
    dl.add_adapter(model, dl.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), "other")
    _train(model)
    models.logits(model, _batch(1))
    dl.save_adapter(model, Path(ctx.tmp) / f"seam_{ctx.layout.name}")
    dl.load_adapter(model, Path(ctx.tmp) / f"seam_{ctx.layout.name}")
    dl.export_peft(model, Path(ctx.tmp) / f"seam_peft_{ctx.layout.name}", overwrite=True)
    dl.add_weighted_adapter(model, ["pissa", "other"], [0.6, 0.4], "ties", combination_type="ties_svd",
                            density=0.5, svd_clamp=0.9)
    dl.add_weighted_adapter(model, ["pissa", "other"], [0.6, 0.4], "dare", combination_type="dare_linear", density=0.5)

    ada = models.from_pretrained(ctx.data["llama"])
    dl.apply_adalora(ada, dl.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, tinit=1, tfinal=1, deltaT=1,
                                           total_step=4, target_modules=TARGETS))

    def allocate(model, step):
        dl.orth_reg_loss(model)
        dl.update_and_allocate(model, step)

    _train(ada, steps=4, after=allocate)
    dl.export_adalora(ada, Path(ctx.tmp) / f"seam_ada_{ctx.layout.name}", format="lora", overwrite=True)

    eva = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(eva, dl.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights="eva"))
    ids = [torch.randint(0, TINY_CONFIGS["llama"]["vocab_size"], (4, 8), generator=torch.Generator().manual_seed(s))
           for s in range(3)]
    dl.initialize_lora_eva_weights(eva, [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids])


@check("tp2", "tp2-sp", "pp2")
def no_tensor_is_created_on_an_implicit_device(ctx):
    with ExplicitDeviceMode() as mode:
        _workload(ctx)
    assert mode.calls > 50, f"the workload made only {mode.calls} factory calls from dist_lora code"
    assert mode.violations == [], "\n".join(sorted(set(mode.violations)))


def _plant(module, name: str, source: str, file: str):
    namespace = dict(vars(module))
    exec(compile(source, str(PACKAGE / file), "exec"), namespace)
    return namespace[name]


@check("tp2")
def the_check_catches_the_original_violations(ctx):
    from dist_lora.layers import slots

    saved = agreement.any_rank, slots.Block.rows
    agreement.any_rank = _plant(agreement, "any_rank", OLD_ANY_RANK, "parallel/agreement.py")
    slots.Block.rows = _plant(slots, "rows", OLD_BLOCK_ROWS, "layers/slots.py")
    try:
        with ExplicitDeviceMode() as mode:
            model = models.from_pretrained(ctx.data["llama"])  # raise_if_any -> any_rank
            dl.apply_lora(model, dl.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
            dl.merge_adapter(model)  # slot rows of the fused layers
    finally:
        agreement.any_rank, slots.Block.rows = saved
    flagged = {v.split(" ")[0].rsplit(":", 1)[0] for v in mode.violations}
    assert flagged == {"dist_lora/parallel/agreement.py", "dist_lora/layers/slots.py"}, mode.violations


test_device_seam_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)


@check("tp2")
def a_dtype_the_base_cannot_take_fails_on_every_rank_before_reading(ctx):
    import pytest

    from dist_lora.models import hf_checkpoint

    opened = []
    real = hf_checkpoint.HFCheckpoint.__init__
    hf_checkpoint.HFCheckpoint.__init__ = lambda self, *a, **k: (opened.append(1), real(self, *a, **k))[1]
    try:
        for dtype in (torch.float64, torch.int8):
            with pytest.raises(agreement.RankError, match=rf"(?s)failed on 2 rank.*dtype={dtype} is not supported"):
                models.from_pretrained(ctx.data["llama"], dtype=dtype)
    finally:
        hf_checkpoint.HFCheckpoint.__init__ = real
    assert opened == [], "the checkpoint was opened before the dtype was checked"
