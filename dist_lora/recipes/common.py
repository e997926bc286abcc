"""What the Megatron and DeepSpeed fine-tuning loops share: the learning-rate schedule, the base
model directory, data, the metrics log (progress bar + ``metrics.jsonl``), the ``latest``
checkpoint pointer, the peft verification of the export, and the loss curve."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dist_lora import parallel
from dist_lora.integrations.bitsandbytes import quantize_4bit
from dist_lora.parallel.collectives import RankError, broadcast_object, group_rank
from dist_lora.recipes.adapter import release
from dist_lora.recipes.config import FinetuneConfig, load_config
from dist_lora.recipes.data import Batches, read_texts, samples, tokenizer_for
from dist_lora.testing.tiny import save_tiny

LATEST = "latest"


def learning_rate(step: int, train) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


DEMO_SOURCE = "dist_lora_demo.json"


def base_dir(config: FinetuneConfig, out: Path, rank: int) -> Path:
    """The HF model directory: ``model.hf_dir``, or the demo model built once by rank 0 into
    ``<output.dir>/base`` (with a note of what it was built from: a later run of another demo
    config or seed in the same directory is refused, not trained on the old weights)."""
    if config.model.hf_dir is not None:
        return Path(config.model.hf_dir)
    base, error = out / "base", None
    if rank == 0:
        source = {"config": json.loads(Path(config.model.demo_config).read_text()), "seed": config.model.demo_seed}
        note = base / DEMO_SOURCE
        if not (base / "config.json").is_file():
            save_tiny(source["config"], base, seed=source["seed"])
            note.write_text(json.dumps(source))
        elif not note.is_file() or json.loads(note.read_text()) != source:
            error = (f"{base} holds a demo model built from another model.demo_config or model.demo_seed; "
                     f"use a new output.dir")
    error = broadcast_object(error)
    if error is not None:
        raise ValueError(error)
    return base


def training_data(config: FinetuneConfig, base: Path, dp_size: int, dp_rank: int) -> tuple[torch.Tensor, Batches]:
    """(held-out sequences [n, seq_len] for verification, this DP rank's training batches)."""
    tokenizer = tokenizer_for(config.data.tokenizer, str(base))
    data = samples(read_texts(config.data.path, config.data.format, config.data.text_field), tokenizer,
                   config.data.seq_len)
    held = min(config.data.holdout_sequences, max(1, len(data) // 10))
    t = config.train
    return data[-held:, :-1], Batches(data[:-held], t.micro_batch_size * t.micro_batches, dp_size, dp_rank)


def latest(checkpoints: Path) -> Path | None:
    pointer = checkpoints / LATEST
    return checkpoints / pointer.read_text().strip() if pointer.is_file() else None


def point_latest(checkpoints: Path, name: str) -> None:
    """Atomically make ``checkpoints/latest`` name the checkpoint ``name`` (rank 0 only)."""
    (checkpoints / f".{LATEST}.tmp").write_text(name)
    (checkpoints / f".{LATEST}.tmp").replace(checkpoints / LATEST)


class MetricsLog:
    """Rank 0's progress bar and ``metrics.jsonl`` (one JSON object per step)."""

    def __init__(self, out: Path, config: FinetuneConfig, start: int, rank: int, dp_size: int):
        from tqdm import tqdm

        t = config.train
        self.file, self.rank = out / "metrics.jsonl", rank
        self.tokens_per_step = t.micro_batch_size * t.micro_batches * dp_size * config.data.seq_len
        self.last = min(t.steps, t.stop_at or t.steps)  # this run's last step (train.stop_at ends it early)
        self.log_every = config.train.log_every
        if rank == 0 and self.file.exists():  # keep only the steps the checkpoint contains
            kept = [line for line in self.file.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            self.file.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=config.train.steps, initial=start, disable=rank != 0, desc="fine-tuning",
                        unit="step", mininterval=1.0)
        self.began = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.tokens_per_step / seconds, "elapsed_s": time.perf_counter() - self.began}
        if self.rank == 0:
            with open(self.file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if step % self.log_every == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", gnorm=f"{grad_norm:.2f}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.update()

    def close(self, out: Path, adapter: Path) -> None:
        self.bar.close()
        if self.rank == 0 and self.file.exists():
            plot(self.file, out / "loss.png")
            print(f"adapter: {adapter}  metrics: {self.file}  loss curve: {out / 'loss.png'}", flush=True)


def verify(ours: torch.Tensor, base: Path, adapter: Path, holdout: torch.Tensor, tolerance: float, rank: int,
           quantize: tuple[str, int] | None = None) -> str:
    """Compare our logits on ``holdout`` with peft's (base + exported adapter) on rank 0; the
    verdict on every rank. With a 4-bit base (``quantize`` = (type, blocksize)) peft runs on the
    base whose linear weights (not lm_head) are replaced by the same dequantised values."""
    verdict = None
    if rank == 0:
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
        if quantize is not None:
            with torch.no_grad():
                for name, module in model.named_modules():
                    if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
                        module.weight.copy_(quantize_4bit(module.weight, *quantize).dequantize())
        reference = peft.PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            theirs = reference(holdout).logits.float()
        diff = (ours.float().cpu() - theirs).abs().max().item()  # peft runs on the host
        ok = diff <= tolerance * max(1.0, theirs.abs().max().item())
        verdict = f"peft verification {'OK' if ok else 'FAILED'}: max |logits - peft| = {diff:.2e}"
    return broadcast_object(verdict)


def plot(metrics_file: Path, out: Path) -> None:
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


def finish(model, logits: Callable[[torch.Tensor], torch.Tensor], config: FinetuneConfig, out: Path, base: Path,
           holdout: torch.Tensor, rank: int, log: MetricsLog, applied) -> int:
    """Release the adapter in PEFT's format (:func:`dist_lora.recipes.adapter.release`), verify each
    export against peft (``logits``: our model's, a collective), draw the loss curve; the exit
    code (1 when a verification fails)."""
    exports = release(model, applied, out, base)
    code = 0
    if config.output.verify:
        tolerance = config.output.verify_tolerance
        if config.train.dtype != "float32":
            tolerance = max(tolerance, 5e-2)
        ours = logits(holdout)
        for adapter in exports:
            verdict = verify(ours, base, adapter, holdout, tolerance, rank, applied.quantize)
            code = code or (0 if "OK" in verdict else 1)
            if rank == 0:
                print(f"{adapter.name}: {verdict}", flush=True)
    log.close(out, exports[0])
    return code


def launcher_main(doc: str, argv: list[str] | None, run_name: str) -> int:
    """The command line of a launch/ script: ``--config``, ``--resume`` and ``section.key=value``
    overrides; the recipe (and the runner's own checks, ``check(config)`` in the runner module) is
    validated before any process group starts, exiting 2 with the bad key named."""
    import importlib

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    runner = importlib.import_module(f"dist_lora.recipes.{run_name}")
    try:
        config = load_config(args.config, args.overrides)
        runner.check(config)
    except (OSError, ValueError) as err:
        print(f"{Path(sys.argv[0]).stem}: config error: {err}", file=sys.stderr)
        return 2
    try:
        return runner.run(config, resume=args.resume)
    except RankError as err:  # raised on every rank together (bad input found after start): say it once
        if group_rank() == 0:
            print(f"{Path(sys.argv[0]).stem}: error: {err}", file=sys.stderr, flush=True)
        parallel.shutdown()
        return 1
