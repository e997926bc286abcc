"""The fine-tuning loop for Megatron models: explicit, one step per iteration, nothing hidden.

Per step: the DP rank's batch -> ``forward_backward`` (Megatron's pipeline schedule with PP,
``train.micro_batches`` micro-batches; the family's router load-balancing loss with
``train.router_aux_loss``) -> ``finalize_grads`` (DP average in Megatron-Core DDP's buckets, expert
gradients over their expert-data-parallel group, TP sums of partial gradients in one bucket) ->
``clip_grad_norm`` (global norm) -> AdamW with linear warm-up and cosine decay. The loss is the
token mean over the whole step (masked tokens never count). Rank 0 shows a progress bar and
appends the metrics to ``metrics.jsonl``; the validation loss is computed before training, every
``train.eval_every`` steps and at the end. Training checkpoints every ``checkpoint.every`` steps
(``--resume`` continues from the latest with bit-identical losses on CPU); at the end the adapter
is exported in PEFT's format, checked against peft on held-out data, and the loss curves are
drawn to ``loss.png`` (:mod:`dist_lora.recipes.report`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import dist_lora as dl
from dist_lora import models, parallel
from dist_lora.models.spec import read_spec, spec_from_config
from dist_lora.models.training import clip_grad_norm, finalize_grads, forward_backward, token_count, use_megatron_ddp
from dist_lora.parallel.device import choose_backend
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


def check(config: FinetuneConfig) -> None:
    """What this runner needs beyond a valid recipe (checked before any process group starts)."""
    if config.deepspeed.config is not None:
        raise ValueError("deepspeed.config is set: run this recipe with launch/finetune_deepspeed.py")
    try:
        choose_backend(config.parallel.backend)  # nccl without CUDA fails here, before any rank starts
    except ValueError as err:
        raise ValueError(f"parallel.{err}") from err
    adapter.check(config, "megatron")
    if config.data.packing:
        m = config.model
        spec = read_spec(m.hf_dir) if m.hf_dir else spec_from_config(json.loads(Path(m.demo_config).read_text()))
        if spec.sliding_window is not None:
            raise ValueError(f"data.packing with a sliding-window model (sliding_window={spec.sliding_window}): "
                             f"Megatron's local attention builds its own window mask and would let packed "
                             f"documents see each other; set data.packing: false")


def _evaluator(model, micro_batches: int):
    groups = models.model_info(model).groups

    def evaluate(batch):
        count = int(token_count(batch.labels, groups))
        loss = forward_backward(model, batch.input_ids, batch.labels, num_microbatches=micro_batches,
                                forward_only=True, router_aux_loss=False, **batch.as_kwargs())
        return loss.item() * count, count  # the language-model loss only

    return evaluate


def run(config: FinetuneConfig, resume: bool = False) -> int:
    """Run the recipe on this process's ranks; returns the exit code."""
    p, t = config.parallel, config.train
    check(config)
    groups = parallel.initialize(p.tensor_parallel, p.pipeline_parallel, p.sequence_parallel, seed=t.seed,
                                 backend=p.backend, expert_parallel=p.expert_parallel,
                                 expert_tensor_parallel=p.expert_tensor_parallel)
    out, checkpoints = Path(config.output.dir), Path(config.checkpoint.dir)
    if groups.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
    base = base_dir(config, out, groups.rank)
    data = recipe_data(config, base, groups.dp_size, groups.dp_rank)  # bad data fails here, on every rank
    batches = data.train
    model = models.from_pretrained(base, dtype=torch.float32 if t.dtype == "float32" else torch.bfloat16,
                                   first_stage_layers=p.first_stage_layers, last_stage_layers=p.last_stage_layers,
                                   moe_token_dispatcher=config.model.moe_token_dispatcher)
    applied = adapter.apply(model, config, batches, out)  # and the 4-bit base, if any
    # Every rank's torch RNG from here on is the same: rank 0 alone drew the demo base's weights,
    # and with lora_dropout the masks on TP-replicated inputs (column layers without SP) must be
    # equal on every TP rank, or the replicated lora_A drifts apart (a resume restores the states).
    torch.manual_seed(t.seed)
    held_out = validation_batches(data.validation, t.micro_batch_size * t.micro_batches, groups.dp_size,
                                  groups.dp_rank)
    evaluate = _evaluator(model, t.micro_batches)

    use_megatron_ddp(model)  # DP gradients reduced in Megatron-Core's buckets
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    start = 0
    resume_from = latest(checkpoints) if resume else None
    if resume_from is not None:
        start = dl.load_training_state(model, optimizer, resume_from)["data_position"]
    log = MetricsLog(out, config, start, groups.rank, groups.dp_size)

    def validate(step: int) -> None:
        if validation_due(step, start, log.last, config):
            model.eval()
            log.validation(step, *validation_loss(held_out, evaluate))
            model.train()

    validate(start)
    for step in range(start, log.last):
        tick = time.perf_counter()
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches(step)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, batch.input_ids, batch.labels, num_microbatches=t.micro_batches,
                                router_aux_loss=t.router_aux_loss, **batch.as_kwargs()).item()
        # the token mean over all DP ranks (plus the router loss, when on)
        penalty = adapter.after_backward(model, applied)  # AdaLoRA's orthogonality penalty
        finalize_grads(model)
        grad_norm = clip_grad_norm(model, t.clip_grad)
        optimizer.step()
        adapter.after_step(model, applied, step)  # AdaLoRA's rank allocation
        if penalty is not None:  # the training objective, as PEFT's AdaLoRA loss
            loss += penalty.item()
        log.step(step + 1, loss, lr, grad_norm, time.perf_counter() - tick)
        validate(step + 1)
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == log.last:
            name = f"step-{step + 1:06d}"
            dl.save_training_state(model, optimizer, checkpoints / name, step=step + 1, data_position=step + 1,
                                   overwrite=True)
            if groups.rank == 0:
                point_latest(checkpoints, name)
    if log.last < t.steps:  # stopped early on purpose: the checkpoint is the result
        log.bar.close()
        parallel.shutdown()
        return 0
    code = finish(model, lambda ids: models.logits(model, ids), config, out, base, data, groups.rank, log, applied)
    parallel.shutdown()
    return code
