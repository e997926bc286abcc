"""The fine-tuning loop for Hugging Face models under DeepSpeed ZeRO (stage 0-3).

The model is the plain ``transformers`` model with dist_lora adapters (TP = 1, every rank a
data-parallel replica; ZeRO partitions optimizer state (1), gradients (2) and parameters (3)).
The client ``torch.optim.AdamW`` holds the adapter parameters only. Per step: for each of
``train.micro_batches`` micro-batches ``engine.backward`` (DeepSpeed scales by the accumulation
count and averages over DP), then ``engine.step`` (clipping at ``train.clip_grad``). Checkpoints
are DeepSpeed's own (``save_checkpoint`` without frozen parameters: the adapter, its optimizer
state partitions and the step); ``--resume`` continues from the latest one. At the end the
adapter is exported in PEFT's format without gathering the base and verified against peft.

The ZeRO JSON (``configs/deepspeed/*.json``) holds the ZeRO settings; batch sizes, clipping
and precision come from the recipe (a JSON that sets them differently is rejected).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_lora import parallel
from dist_lora.integrations import deepspeed as ds
from dist_lora.models.training import IGNORE_INDEX
from dist_lora.parallel.collectives import all_reduce_
from dist_lora.recipes import adapter
from dist_lora.recipes.common import (
    MetricsLog,
    base_dir,
    latest,
    learning_rate,
    point_latest,
    validation_due,
    validation_loss,
)
from dist_lora.recipes.config import FinetuneConfig
from dist_lora.recipes.data import recipe_data, validation_batches
from dist_lora.recipes.report import finish


def engine_config(config: FinetuneConfig) -> dict:
    """The ZeRO JSON completed with the recipe's batch, clipping and precision settings."""
    path = Path(config.deepspeed.config)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"deepspeed.config {path}: {err}") from err
    t = config.train
    ours = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.micro_batches,
            "gradient_clipping": t.clip_grad, "bf16": {"enabled": t.dtype == "bfloat16"}}
    for key, value in ours.items():
        if key in data and data[key] != value:
            raise ValueError(f"deepspeed.config {path} sets {key}={data[key]!r}, but the recipe says {value!r}; "
                             f"set it in the recipe (train.*) and remove it from the JSON")
    if "train_batch_size" in data:
        raise ValueError(f"deepspeed.config {path} sets train_batch_size; remove it (it follows from "
                         f"train.micro_batch_size x train.micro_batches x ranks)")
    if "optimizer" in data or "scheduler" in data:
        raise ValueError(f"deepspeed.config {path} defines an optimizer/scheduler; the recipe's AdamW over the "
                         f"adapter parameters and its schedule are used, remove them from the JSON")
    data.update(ours)
    data.setdefault("zero_allow_untested_optimizer", True)
    data.setdefault("steps_per_print", 10 ** 9)
    return data


def _loss_sum(engine, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token loss of one micro-batch (-100 labels ignored)."""
    logits = engine(ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _global_count(labels: torch.Tensor, dp_group) -> int:
    return int(all_reduce_((labels != IGNORE_INDEX).sum().to(torch.int64), dp_group).item())


def check(config: FinetuneConfig) -> None:
    """What this runner needs beyond a valid recipe (checked before any process group starts)."""
    if config.deepspeed.config is None:
        raise ValueError("deepspeed.config is not set: name a ZeRO JSON, e.g. deepspeed.config=configs/deepspeed/zero3.json")
    if config.parallel.tensor_parallel != 1 or config.parallel.pipeline_parallel != 1 or config.parallel.sequence_parallel:
        raise ValueError("the DeepSpeed path is data-parallel only: set parallel.tensor_parallel=1, "
                         "parallel.pipeline_parallel=1, parallel.sequence_parallel=false (or use launch/finetune.py)")
    adapter.check(config, "deepspeed")
    if config.data.packing:
        raise ValueError("data.packing is supported by launch/finetune.py; the DeepSpeed recipe feeds the Hugging "
                         "Face model without a document mask: set data.packing: false")
    engine_config(config)


def run(config: FinetuneConfig, resume: bool = False) -> int:
    """Run the recipe under DeepSpeed on this process's ranks; returns the exit code."""
    from transformers import AutoModelForCausalLM

    t = config.train
    check(config)
    ds_config = engine_config(config)
    groups = parallel.initialize(1, 1, False, seed=t.seed)
    out, checkpoints = Path(config.output.dir), Path(config.checkpoint.dir)
    if groups.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
    base = base_dir(config, out, groups.rank)
    data = recipe_data(config, base, groups.dp_size, groups.dp_rank)  # bad data fails here, on every rank
    batches = data.train
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32).train()
    applied = adapter.apply(model, config, batches, out)  # and the 4-bit base, if any
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    engine = ds.initialize(model, optimizer, ds_config)
    start = 0
    resume_from = latest(checkpoints) if resume else None
    if resume_from is not None:
        start = ds.load_checkpoint(engine, resume_from)["data_position"]
    log = MetricsLog(out, config, start, groups.rank, groups.dp_size)
    held_out = validation_batches(data.validation, t.micro_batch_size * t.micro_batches, groups.dp_size,
                                  groups.dp_rank)

    def evaluate(batch):
        with torch.no_grad():
            summed = _loss_sum(engine, batch.input_ids, batch.labels).detach()
        return all_reduce_(summed, groups.dp_group).item(), _global_count(batch.labels, groups.dp_group)

    def validate(step: int) -> None:
        if validation_due(step, start, log.last, config):
            engine.eval()
            log.validation(step, *validation_loss(held_out, evaluate))
            engine.train()

    validate(start)
    for step in range(start, log.last):
        tick = time.perf_counter()
        lr = learning_rate(step, t)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        batch = batches(step)
        # The token mean over the whole step: DeepSpeed divides each backward by the accumulation
        # steps and averages over DP ranks, so each micro-batch's sum is scaled by (m * dp / count).
        count = max(_global_count(batch.labels, groups.dp_group), 1)
        scale = t.micro_batches * groups.dp_size / count
        sums = []
        for micro_ids, micro_labels in zip(batch.input_ids.chunk(t.micro_batches), batch.labels.chunk(t.micro_batches)):
            summed = _loss_sum(engine, micro_ids, micro_labels)
            engine.backward(summed * scale)
            engine.step()  # applies the update at the accumulation boundary only
            sums.append(summed.detach())
        loss = all_reduce_(torch.stack(sums).sum(), groups.dp_group).item() / count
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        log.step(step + 1, loss, lr, grad_norm, time.perf_counter() - tick)
        validate(step + 1)
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == log.last:
            name = f"step-{step + 1:06d}"
            ds.save_checkpoint(engine, checkpoints / name, {"step": step + 1, "data_position": step + 1})
            if groups.rank == 0:
                point_latest(checkpoints, name)
    if log.last < t.steps:
        log.bar.close()
        parallel.shutdown()
        return 0
    engine.eval()

    def logits(ids):
        with torch.no_grad():
            return engine(ids).logits

    code = finish(model, logits, config, out, base, data, groups.rank, log, applied)
    parallel.shutdown()
    return code
