"""The end of a fine-tuning run: release the adapter, verify each export against peft on the
held-out data, report the validation loss before and after, answer held-out prompts with the
base and the fine-tuned model, and draw the loss curves (training and validation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from dist_lora.integrations.bitsandbytes import quantize_4bit
from dist_lora.parallel.collectives import broadcast_object
from dist_lora.recipes import answers
from dist_lora.recipes.adapter import release
from dist_lora.recipes.config import FinetuneConfig


def reference_model(base: Path, adapter: Path, quantize: tuple[str, int] | None = None):
    """transformers + peft with ``adapter`` on ``base`` (float32, eval). With a 4-bit base
    (``quantize`` = (type, blocksize)) its linear weights (not lm_head) are replaced by the same
    dequantised values the run trained on."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    if quantize is not None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
                    module.weight.copy_(quantize_4bit(module.weight, *quantize).dequantize())
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def verdict(ours: torch.Tensor, reference, holdout: torch.Tensor, tolerance: float) -> str:
    with torch.no_grad():
        theirs = reference(holdout).logits.float()
    diff = (ours.float() - theirs).abs().max().item()
    ok = diff <= tolerance * max(1.0, theirs.abs().max().item())
    return f"peft verification {'OK' if ok else 'FAILED'}: max |logits - peft| = {diff:.2e}"


def validation_summary(metrics_file: Path) -> str | None:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val_loss" in r]
    if not val:
        return None
    first, last = val[0], val[-1]
    return (f"validation loss: {first['val_loss']:.4f} at step {first['step']} -> {last['val_loss']:.4f} at step "
            f"{last['step']} ({last['val_tokens']} held-out target tokens)")


def plot(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token mean)")
    ax.set_title("dist_lora fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def finish(model, logits: Callable[[torch.Tensor], torch.Tensor], config: FinetuneConfig, out: Path, base: Path,
           data, rank: int, log, applied) -> int:
    """Release the adapter in PEFT's format (:func:`dist_lora.recipes.adapter.release`), verify each
    export against peft on the held-out samples (``logits``: our model's, a collective), print the
    validation loss before / after and the held-out answers, draw the loss curves; the exit code
    (1 when a verification fails). ``data`` is the run's :class:`~dist_lora.recipes.data.RecipeData`."""
    exports = release(model, applied, out, base)
    code = 0
    holdout = data.holdout(config.data.holdout_sequences)
    ours = logits(holdout) if config.output.verify else None
    report = None
    if rank == 0:
        lines = []
        for number, adapter in enumerate(exports):
            needed = config.output.verify or (number == 0 and config.output.answer_prompts)
            reference = reference_model(base, adapter, applied.quantize) if needed else None
            if config.output.verify:
                tolerance = config.output.verify_tolerance
                if config.train.dtype != "float32":
                    tolerance = max(tolerance, 5e-2)
                lines.append(f"{adapter.name}: {verdict(ours, reference, holdout, tolerance)}")
            if number == 0 and config.output.answer_prompts:
                lines.append(held_out_answers(reference, config, base, data, out))
        summary = validation_summary(log.file) if log.file.exists() else None
        report = "\n".join(([summary] if summary else []) + lines)
    report = broadcast_object(report)
    if "FAILED" in report:
        code = 1
    if rank == 0 and log.file.exists():
        plot(log.file, out / "loss.png")
    log.close(out, exports[0])
    if rank == 0:
        print(report, flush=True)
    return code


def held_out_answers(reference, config: FinetuneConfig, base: Path, data, out: Path) -> str:
    lines = data.validation_lines()[: config.output.answer_prompts]
    path = config.data.eval_path or config.data.path
    items = answers.held_out(path, config.data.format, lines)
    return answers.compare(reference, base, items, config.data.format, config.output.max_new_tokens, out)
