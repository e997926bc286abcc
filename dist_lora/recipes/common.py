"""What the Megatron and DeepSpeed fine-tuning loops share: the learning-rate schedule, the base
model directory, the metrics log (progress bar + ``metrics.jsonl``, training and validation
loss), the validation loop, the ``latest`` checkpoint pointer, and the launcher's command line.
(Data: :mod:`dist_lora.recipes.data`; the end of a run: :mod:`dist_lora.recipes.report`.)"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from dist_lora import parallel
from dist_lora.parallel import faults
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import broadcast_object, group_rank
from dist_lora.parallel.launch_env import LaunchError
from dist_lora.parallel.slurm_env import cancel_step
from dist_lora.recipes import paths
from dist_lora.recipes.config import FinetuneConfig, load_config
from dist_lora.recipes.data import Batch
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

    def validation(self, step: int, loss: float, tokens: int) -> None:
        """A ``{"step", "val_loss", "val_tokens"}`` row (step 0: before training)."""
        if self.rank == 0:
            with open(self.file, "a") as handle:
                handle.write(json.dumps({"step": step, "val_loss": loss, "val_tokens": tokens}) + "\n")
            self.bar.write(f"step {step}: validation loss {loss:.4f} ({tokens} tokens)")

    def close(self, out: Path, adapter: Path) -> None:
        self.bar.close()
        if self.rank == 0:
            print(f"adapter: {adapter}  metrics: {self.file}  loss curve: {out / 'loss.png'}", flush=True)


def validation_due(step: int, start: int, last: int, config: FinetuneConfig) -> bool:
    """Whether the validation loss is computed after ``step`` (0: before training): before a fresh
    run, every ``train.eval_every`` steps, and at the run's last step."""
    every = config.train.eval_every
    return (step == 0 and start == 0) or step == last or (every > 0 and step % every == 0 and step > start)


def validation_loss(batches: list[Batch], evaluate: Callable[[Batch], tuple[float, int]]) -> tuple[float, int]:
    """Token-mean loss over all ``batches`` (every rank its own, the same number on each) and the
    number of tokens; ``evaluate(batch)`` returns the global (all DP ranks) loss sum and count."""
    total, count = 0.0, 0
    for batch in batches:
        summed, tokens = evaluate(batch)
        total, count = total + summed, count + tokens
    return total / max(count, 1), count


def launcher_main(doc: str, argv: list[str] | None, run_name: str) -> int:
    """The command line of a launch/ script: ``--config``, ``--resume``, ``--check`` and
    ``section.key=value`` overrides. The recipe, its paths (:mod:`dist_lora.recipes.paths`) and the
    runner's own checks (``check(config)`` in the runner module) are validated before any process
    group starts, exiting 2 with the bad key named (``--check``: then exit 0 without starting).
    A launcher problem (:class:`~dist_lora.parallel.launch_env.LaunchError`) exits 2 and a lost or
    silent peer 1, each with one line that names it instead of a traceback."""
    import importlib

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--check", action="store_true", help="validate the recipe and its paths, then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    runner = importlib.import_module(f"dist_lora.recipes.{run_name}")
    prog = Path(sys.argv[0]).stem
    try:
        config = load_config(args.config, args.overrides)
        paths.check(config)
        runner.check(config)
    except (OSError, ValueError) as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    try:
        return runner.run(config, resume=args.resume)
    except LaunchError as err:
        print(f"{prog}: launch error: {err}", file=sys.stderr, flush=True)
        return 2
    except RankError as err:  # raised on every rank together (bad input found after start): say it once
        if group_rank() == 0:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        parallel.shutdown()
        return 1
    except RuntimeError as err:
        failure = faults.describe(err)
        if failure is None:
            raise
        print(f"\n{prog}: rank {group_rank()}: {failure.message}", file=sys.stderr, flush=True)
        if failure.silent:
            done = cancel_step()
            if done:
                print(f"{prog}: rank {group_rank()}: {done}", file=sys.stderr, flush=True)
        return 1
