"""The fine-tuning loop for Megatron models: explicit, one step per iteration, nothing hidden.

Per step: the DP rank's batch -> ``forward_backward`` (Megatron's pipeline schedule with PP,
``train.micro_batches`` micro-batches) -> ``finalize_grads`` (DP average, SP sums) ->
``clip_grad_norm`` (global norm) -> AdamW with linear warm-up and cosine decay. Rank 0 shows a
progress bar and appends the metrics to ``metrics.jsonl``. Training checkpoints every
``checkpoint.every`` steps (``--resume`` continues from the latest with bit-identical losses on
CPU); at the end the adapter is exported in PEFT's format, checked against peft on held-out
data, and the loss curve is drawn to ``loss.png``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import dist_lora as dl
from dist_lora import models, parallel
from dist_lora.models.training import clip_grad_norm, finalize_grads, forward_backward
from dist_lora.parallel.collectives import all_reduce_, barrier, broadcast_object
from dist_lora.recipes.config import FinetuneConfig
from dist_lora.recipes.data import Batches, read_texts, samples, tokenizer_for

LATEST = "latest"


def learning_rate(step: int, train) -> float:
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _base_dir(config: FinetuneConfig, out: Path, rank: int) -> Path:
    if config.model.hf_dir is not None:
        return Path(config.model.hf_dir)
    base = out / "base"
    if rank == 0 and not (base / "config.json").is_file():
        from dist_lora.testing.tiny import save_tiny

        save_tiny(config.model.demo_config, base, seed=config.model.demo_seed)
    barrier()
    return base


def _latest(checkpoints: Path) -> Path | None:
    pointer = checkpoints / LATEST
    return checkpoints / pointer.read_text().strip() if pointer.is_file() else None


def _verify(model, base: Path, adapter: Path, holdout: torch.Tensor, tolerance: float, rank: int) -> str:
    ours = models.logits(model, holdout)
    verdict = None
    if rank == 0:
        import peft
        from transformers import AutoModelForCausalLM

        reference = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32), adapter).eval()
        with torch.no_grad():
            theirs = reference(holdout).logits.float()
        diff = (ours - theirs).abs().max().item()
        ok = diff <= tolerance * max(1.0, theirs.abs().max().item())
        verdict = f"peft verification {'OK' if ok else 'FAILED'}: max |logits - peft| = {diff:.2e}"
    return broadcast_object(verdict)


def _plot(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("dist_lora fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def run(config: FinetuneConfig, resume: bool = False) -> int:
    """Run the recipe on this process's ranks; returns the exit code."""
    from tqdm import tqdm

    p, t = config.parallel, config.train
    groups = parallel.initialize(p.tensor_parallel, p.pipeline_parallel, p.sequence_parallel, seed=t.seed)
    out, checkpoints = Path(config.output.dir), Path(config.checkpoint.dir)
    if groups.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
    base = _base_dir(config, out, groups.rank)
    dtype = torch.float32 if t.dtype == "float32" else torch.bfloat16
    model = models.from_pretrained(base, dtype=dtype)
    dl.apply_lora(model, config.lora_config())

    tokenizer = tokenizer_for(config.data.tokenizer, str(base))
    data = samples(read_texts(config.data.path, config.data.format, config.data.text_field), tokenizer,
                   config.data.seq_len)
    held = min(config.data.holdout_sequences, max(1, len(data) // 10))
    holdout, train_data = data[-held:, :-1], data[:-held]
    batches = Batches(train_data, t.micro_batch_size * t.micro_batches, groups.dp_size, groups.dp_rank)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    start = 0
    latest = _latest(checkpoints) if resume else None
    if latest is not None:
        start = dl.load_training_state(model, optimizer, latest)["data_position"]
    metrics_file = out / "metrics.jsonl"
    if groups.rank == 0 and metrics_file.exists():  # keep only the steps the checkpoint contains
        kept = [line for line in metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    bar = tqdm(total=t.steps, initial=start, disable=groups.rank != 0, desc="fine-tuning", unit="step",
               mininterval=1.0)
    tokens_per_step = t.micro_batch_size * t.micro_batches * groups.dp_size * config.data.seq_len
    began = time.perf_counter()
    last = min(t.steps, t.stop_at or t.steps)
    for step in range(start, last):
        tick = time.perf_counter()
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, labels = batches(step)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, ids, labels, num_microbatches=t.micro_batches)
        finalize_grads(model)
        grad_norm = clip_grad_norm(model, t.clip_grad)
        optimizer.step()
        loss = all_reduce_(loss.detach().clone(), groups.dp_group).item() / groups.dp_size
        seconds = time.perf_counter() - tick
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_step / seconds, "elapsed_s": time.perf_counter() - began}
        if groups.rank == 0:
            with open(metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if (step + 1) % t.log_every == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", gnorm=f"{grad_norm:.2f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update()
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == last:
            name = f"step-{step + 1:06d}"
            dl.save_training_state(model, optimizer, checkpoints / name, step=step + 1, data_position=step + 1,
                                   overwrite=True)
            if groups.rank == 0:
                (checkpoints / f".{LATEST}.tmp").write_text(name)
                (checkpoints / f".{LATEST}.tmp").replace(checkpoints / LATEST)
    bar.close()
    if last < t.steps:  # stopped early on purpose: the checkpoint is the result
        parallel.shutdown()
        return 0
    adapter = out / "adapter"
    dl.export_peft(model, adapter, base_model_name_or_path=str(base), overwrite=True)
    code = 0
    if config.output.verify:
        tolerance = config.output.verify_tolerance if dtype == torch.float32 else max(config.output.verify_tolerance, 5e-2)
        verdict = _verify(model, base, adapter, holdout, tolerance, groups.rank)
        code = 0 if "OK" in verdict else 1
        if groups.rank == 0:
            print(verdict, flush=True)
    if groups.rank == 0 and metrics_file.exists():
        _plot(metrics_file, out / "loss.png")
        print(f"adapter: {adapter}  metrics: {metrics_file}  loss curve: {out / 'loss.png'}", flush=True)
    parallel.shutdown()
    return code
