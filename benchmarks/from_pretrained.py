"""Benchmark: ``dist_lora.models.from_pretrained`` at TP=1 and TP=2, side by side in one run.

    .venv/bin/python benchmarks/from_pretrained.py            # writes benchmarks/results/from_pretrained.md

Generates a Llama-layout checkpoint of ~300 MB (random float32 weights), then loads it in
1 process (TP=1) and 2 processes (TP=2) and, for reference, with ``transformers`` in one
process. Per rank it records the wall time of the load, the peak RSS of the process and its
growth during the load, and the tensor bytes the rank read from the safetensors file (each rank
should read ~1/TP of the file). Results go to a Markdown file with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
          "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
          "vocab_size": 16000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(directory: Path) -> int:
    import torch
    from safetensors.torch import save_file

    c, g = CONFIG, torch.Generator().manual_seed(0)
    h, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return (directory / "model.safetensors").stat().st_size


def worker(model_dir: str, out: str) -> None:
    from dist_lora import models, parallel

    groups = parallel.initialize(tensor_parallel=int(os.environ.get("WORLD_SIZE", "1")))
    rss_before = _rss_mb()
    start = time.perf_counter()
    model = models.from_pretrained(model_dir)
    seconds = time.perf_counter() - start
    record = {"rank": groups.rank, "tp": groups.tp_size, "seconds": seconds, "peak_rss_mb": _rss_mb(),
              "rss_growth_mb": _rss_mb() - rss_before, "bytes_read": model.dist_lora.bytes_read}
    Path(out, f"tp{groups.tp_size}_rank{groups.rank}.json").write_text(json.dumps(record))
    parallel.shutdown()


def transformers_worker(model_dir: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    rss_before = _rss_mb()
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seconds = time.perf_counter() - start
    Path(out, "transformers.json").write_text(json.dumps(
        {"seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_growth_mb": _rss_mb() - rss_before}))


def run(model_dir: Path, out: Path, tp: int) -> list[dict]:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={tp}", __file__,
           "--worker", str(model_dir), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return [json.loads((out / f"tp{tp}_rank{r}.json").read_text()) for r in range(tp)]


def machine() -> str:
    import megatron.core
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.platform()}; {cpu}; {os.cpu_count()} cores; {mem:.0f} GiB RAM; torch {torch.__version__}; "
            f"megatron-core {megatron.core.__version__}; no GPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "OUT"))
    parser.add_argument("--transformers-worker", nargs=2, metavar=("MODEL_DIR", "OUT"))
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is kept")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "from_pretrained.md"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.transformers_worker:
        return transformers_worker(*args.transformers_worker)

    work = Path(tempfile.mkdtemp(prefix="dist_lora_bench_"))
    try:
        size = generate(work / "model")
        best: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for tp in (1, 2):
                out = work / f"out_tp{tp}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                records = run(work / "model", out, tp)
                key = f"TP={tp}"
                if key not in best or max(r["seconds"] for r in records) < max(r["seconds"] for r in best[key]):
                    best[key] = records
            subprocess.run([sys.executable, __file__, "--transformers-worker", str(work / "model"), str(work)],
                           check=True, capture_output=True, timeout=600)
            ref = json.loads((work / "transformers.json").read_text())
            if "transformers" not in best or ref["seconds"] < best["transformers"][0]["seconds"]:
                best["transformers"] = [ref]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tp1, tp2, hf = best["TP=1"][0], best["TP=2"], best["transformers"][0]
    lines = [
        "# `from_pretrained` at TP=1 and TP=2", "",
        f"Command: `.venv/bin/python benchmarks/from_pretrained.py --repeats {args.repeats}`", "",
        f"Machine: {machine()}", "",
        f"Checkpoint: Llama layout, {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, "
        f"FFN {CONFIG['intermediate_size']}, vocab {CONFIG['vocab_size']}, float32, one safetensors file of "
        f"{size / 1e6:.1f} MB. Best of {args.repeats} runs per configuration.", "",
        "| load | rank | wall s | peak RSS MB | RSS growth MB | bytes read MB | read / file |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, records in (("dist_lora TP=1", best["TP=1"]), ("dist_lora TP=2", tp2)):
        for r in records:
            lines.append(f"| {name} | {r['rank']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['rss_growth_mb']:.0f} | {r['bytes_read'] / 1e6:.1f} | {r['bytes_read'] / size:.3f} |")
    lines.append(f"| transformers (reference) | - | {hf['seconds']:.2f} | {hf['peak_rss_mb']:.0f} | "
                 f"{hf['rss_growth_mb']:.0f} | - | - |")
    worst2 = max(tp2, key=lambda r: r["seconds"])
    lines += ["", "Ratios (TP=2 rank / TP=1):", "",
              f"- bytes read per rank: {max(r['bytes_read'] for r in tp2) / tp1['bytes_read']:.3f} (ideal 0.5)",
              f"- RSS growth per rank: {max(r['rss_growth_mb'] for r in tp2) / tp1['rss_growth_mb']:.2f}",
              f"- wall time (slowest rank): {worst2['seconds'] / tp1['seconds']:.2f}",
              f"- TP=1 wall time / transformers: {tp1['seconds'] / hf['seconds']:.2f}", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    Path(args.output).with_suffix(".json").write_text(json.dumps({**best, "file_bytes": size}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
