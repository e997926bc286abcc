"""Benchmark: what LoRA and DoRA cost over the frozen base, full fine-tuning and transformers + peft.

    .venv/bin/python benchmarks/lora_overhead.py                 # CPU, float32: writes benchmarks/results/lora_overhead.md
    .venv/bin/python benchmarks/lora_overhead.py --device cuda --dtype bfloat16   # one GPU, Llama-3-8B-shaped layers

One Llama model (CPU default: hidden 1024, 4 layers, 16 heads / 4 KV heads, FFN 2816, vocabulary
2048; ``--device cuda``: Llama-3-8B's layer shape, hidden 4096, FFN 14336, 32 / 8 heads, 4 layers),
1024 tokens per step (2 x 512), r=16 / alpha=32 on every linear layer (``all-linear``). Per
layout (TP=1; TP=2 without and with SP, two processes) the variants are built once in the same
processes and timed *interleaved*: every repetition runs one step of each, in an order rotated
per repetition, so a busy machine slows all of them alike; the ratios are taken per repetition
(paired) and reported as median and [min, max], beside the ratio of the fastest steps (on a
shared machine other processes only ever add time, so the fastest step is the least disturbed
one); the raw times go to a ``.json`` beside the table. A step is ``forward_backward`` +
``finalize_grads`` (no optimizer step): the base path of every variant is the same Megatron
model with the same tokens.

* ``frozen``: Megatron base, nothing trainable, the embedding output requires grad (a backward of
  input gradients only, as under LoRA); ``lora`` / ``dora``: dist_lora adapters; ``full``: every
  parameter trainable.
* At TP=1 also ``hf_frozen``, ``peft_lora``, ``peft_dora``: transformers (its default attention,
  SDPA) + peft on the same weights and tokens; ``hf_frozen`` / ``frozen`` is the gap that is
  Megatron's own base path, not the adapters'.
* Collectives per step (TP > 1), counted through torch.distributed
  (:mod:`dist_lora.testing.collective_count`): forward + backward, and ``finalize_grads``.

Each process uses ``--threads`` threads (default 1), so TP=2 uses two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                vocab_size=2048),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=8192),
}
MEGATRON = ("frozen", "lora", "dora", "full")
HF = ("hf_frozen", "peft_lora", "peft_dora")


def _config(shape: str, layers: int, seq: int) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                max_position_embeddings=max(seq, 128), rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=False, **SHAPES[shape])


def _lora_config(dora: bool) -> dict:
    return dict(r=16, lora_alpha=32, target_modules="all-linear", use_dora=dora)


# ------------------------------------------------------------------------------------------
# worker (one per rank, started by torchrun)
# ------------------------------------------------------------------------------------------


def _input_grads(module) -> None:
    module.register_forward_hook(lambda _m, _i, out: out.requires_grad_() if not out.requires_grad else out)


def _megatron_variants(base: str, dtype, device):

    import dist_lora as dl
    from dist_lora import models

    out = {}
    for name in MEGATRON:
        model = models.from_pretrained(base, dtype=dtype)
        for param in model.parameters():
            param.requires_grad_(name == "full")
        if name in ("lora", "dora"):
            dl.apply_lora(model, dl.LoraConfig(**_lora_config(name == "dora")))
        if name != "full":
            _input_grads(model.embedding)
        out[name] = model.to(device)
    return out


def _hf_variants(base: str, dtype, device):
    import peft
    from transformers import AutoModelForCausalLM

    out = {}
    for name in HF:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        for param in model.parameters():
            param.requires_grad_(False)
        if name != "hf_frozen":
            model = peft.get_peft_model(model, peft.LoraConfig(**_lora_config(name == "peft_dora")))
        _input_grads(model.get_input_embeddings())
        out[name] = model.to(device).train()
    return out


def worker(args) -> None:
    import torch

    from dist_lora import parallel
    from dist_lora.models.training import finalize_grads, forward_backward
    from dist_lora.parallel.collectives import barrier
    from dist_lora.testing.collective_count import count_collectives
    from dist_lora.testing.peft_reference import loss_of

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    groups = parallel.initialize(tensor_parallel=args.tp, sequence_parallel=args.sp, seed=1)
    variants = _megatron_variants(args.base, dtype, device)
    if args.tp == 1 and not args.counts_only:
        variants.update(_hf_variants(args.base, dtype, device))
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)

    def step(name):
        model = variants[name]
        for param in model.parameters():
            param.grad = None
        if name in MEGATRON:
            forward_backward(model, ids, labels)
            finalize_grads(model)
        else:
            loss_of(model(ids).logits, labels).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        barrier()

    counts = {}
    if args.tp > 1:
        for name in MEGATRON:
            with count_collectives() as seen:
                forward_backward(variants[name], ids, labels)
            with count_collectives() as done:
                finalize_grads(variants[name])
            counts[name] = {"forward_backward": _by_op(seen.calls), "finalize_grads": _by_op(done.calls)}
    times = {name: [] for name in variants}
    if not args.counts_only:
        names = list(variants)
        for _ in range(args.warmup):
            for name in names:
                step(name)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                sync()
                start = time.perf_counter()
                step(name)
                sync()
                times[name].append(time.perf_counter() - start)
    if groups.rank == 0:
        Path(args.out).write_text(json.dumps({"times": times, "counts": counts}))
    parallel.shutdown()


def _by_op(calls) -> dict:
    out: dict = {}
    for name, _group, _numel in calls:
        out[name] = out.get(name, 0) + 1
    return out


# ------------------------------------------------------------------------------------------
# parent: build the model, run the layouts, write the table
# ------------------------------------------------------------------------------------------


def _run_layout(args, base: Path, tp: int, sp: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={tp}", __file__,
               "--worker", "--base", str(base), "--out", str(out), "--tp", str(tp), "--shape", args.shape,
               "--reps", str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--sp"] if sp else []
        cmd += ["--counts-only"] if args.counts_only else []
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=ROOT, env=env)
        if proc.returncode:
            raise RuntimeError(f"layout TP={tp} SP={sp} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(out.read_text())


def _ratio(times: dict, num: str, den: str) -> str:
    if not times.get(num) or not times.get(den):
        return "-"
    ratios = [a / b for a, b in zip(times[num], times[den])]
    fastest = min(times[num]) / min(times[den])
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] | {fastest:.3f}"


def _machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), cpu)
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.platform()}; {cpu}; nproc {nproc}; torch {torch.__version__}; {gpu}"


def _report(args, results: dict, machine: str, loads: tuple) -> str:
    lines = [f"# LoRA / DoRA overhead: {args.device}, {args.dtype}", "",
             f"Command: `.venv/bin/python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             "", f"Machine: {machine}", "",
             f"Load average (1 min) at start / end: {loads[0]:.1f} / {loads[1]:.1f} (the machine is shared).", "",
             f"Model: Llama, {json.dumps(_config(args.shape, args.layers, args.seq))}; {args.batch} x {args.seq} "
             f"tokens per step; r=16, alpha=32, all-linear; {args.threads} thread(s) per process; "
             f"{args.reps} interleaved repetitions after {args.warmup} warm-up steps of each variant.", ""]
    for layout, res in results.items():
        times = res["times"]
        if any(times.values()):
            lines += [f"## {layout}", "", "| variant | median step s | min | max |", "| --- | --- | --- | --- |"]
            for name, values in times.items():
                if values:
                    lines.append(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
            lines += ["", "| ratio | paired per repetition: median [min, max] | fastest step / fastest step |",
                      "| --- | --- | --- |"]
            pairs = [("lora", "frozen"), ("dora", "lora"), ("lora", "full"), ("dora", "frozen")]
            if "peft_lora" in times and times["peft_lora"]:
                pairs += [("lora", "peft_lora"), ("dora", "peft_dora"), ("frozen", "hf_frozen"),
                          ("peft_lora", "hf_frozen"), ("peft_dora", "peft_lora")]
            for num, den in pairs:
                lines.append(f"| {num} / {den} | {_ratio(times, num, den)} |")
            if "peft_lora" in times and times["peft_lora"]:
                # dist_lora / peft = (Megatron base / HF base) x (our adapter cost / peft's adapter cost)
                share = [(a / b) / (c / d) for a, b, c, d in
                         zip(times["lora"], times["frozen"], times["peft_lora"], times["hf_frozen"])]
                fastest = (min(times["lora"]) / min(times["frozen"])) / (min(times["peft_lora"]) / min(times["hf_frozen"]))
                lines.append(f"| (lora / frozen) / (peft_lora / hf_frozen): the adapters alone | "
                             f"{statistics.median(share):.3f} [{min(share):.3f}, {max(share):.3f}] | {fastest:.3f} |")
            lines.append("")
        if res["counts"]:
            lines += [f"### {layout}: collectives per step ({args.layers} layers, one micro-batch)", "",
                      "| variant | forward + backward | finalize_grads |", "| --- | --- | --- |"]
            for name, c in res["counts"].items():
                fb = ", ".join(f"{k} {v}" for k, v in sorted(c["forward_backward"].items()))
                fin = ", ".join(f"{k} {v}" for k, v in sorted(c["finalize_grads"].items())) or "none"
                lines.append(f"| {name} | {fb} (total {sum(c['forward_backward'].values())}) | {fin} |")
            frozen = sum(res["counts"]["frozen"]["forward_backward"].values())
            for name in ("lora", "dora"):
                extra = sum(res["counts"][name]["forward_backward"].values()) - frozen
                lines.append(f"\n{name}: {extra:+d} collective(s) per step over the frozen base in forward + backward "
                             f"({extra / args.layers:+.2f} per layer if it grew with the layers)")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layouts", default=None, help="comma-separated of tp1, tp2, tp2-sp (cuda: tp1)")
    parser.add_argument("--counts-only", action="store_true", help="only count collectives (TP > 1 layouts)")
    args = parser.parse_args()
    args.shape = args.shape or ("llama3-8b" if args.device == "cuda" else "cpu")
    if args.worker:
        worker(args)
        return
    from dist_lora.testing.tiny import hf_model

    layouts = (args.layouts or ("tp1" if args.device == "cuda" else "tp1,tp2,tp2-sp")).split(",")
    machine, load_start = _machine(), os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        model = hf_model(_config(args.shape, args.layers, args.seq), seed=0, std=0.02)
        model.to(getattr(torch, args.dtype)).save_pretrained(tmp)
        del model
        for layout in layouts:
            tp, sp = int(layout[2]), layout.endswith("-sp")
            results[f"TP={tp}" + (" + SP" if sp else "")] = _run_layout(args, Path(tmp), tp, sp)
            print(layout, "done", flush=True)
    text = _report(args, results, machine, (load_start, os.getloadavg()[0]))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "lora_overhead.md" if args.device == "cpu" else f"lora_overhead_{args.device}.md")
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")  # raw step times and counts
    print(text)


if __name__ == "__main__":
    main()
