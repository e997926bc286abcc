"""Benchmark: wall time of PiSSA / pissa_niter_4 / OLoRA / LoftQ initialisation, dist_lora at TP=1
and TP=2 against PEFT on the same full matrix, Llama-3-8B layer shapes, CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weight_init.py   # writes benchmarks/results/weight_init.md

Shapes [out, in] and their TP layout: q/o_proj 4096x4096 and k/v_proj 1024x4096 and
gate/up_proj 14336x4096 (column-parallel: rows sharded), down_proj 4096x14336 (row-parallel:
columns sharded); r = 16, float32, weights N(0, 0.02^2) from a fixed seed. PEFT runs
``get_peft_model`` on an ``nn.Linear`` holding the full matrix (LoftQ with its compute device
set to the CPU, see ``dist_lora.testing.peft_init_reference``); dist_lora runs the same method
module ``apply_lora`` calls, on one process (TP=1) and on two torchrun processes over gloo
(TP=2, each holding its shard; the time is the slower rank's). One thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj/o_proj": (4096, 4096, 0), "k_proj/v_proj": (1024, 4096, 0),
          "gate_proj/up_proj": (14336, 4096, 0), "down_proj": (4096, 14336, 1)}
METHODS = ("pissa", "pissa_niter_4", "olora", "loftq")
R, ALPHA = 16, 32


def _weight(shape):
    import torch

    return torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(0)) * 0.02


def _config(method: str):
    from dist_lora import LoraConfig

    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if method == "loftq" else {}
    return LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=method, **extra)


def time_ours(method: str, local, dim, group, rank: int, tp: int) -> float:
    import torch

    from dist_lora.config.init_names import weight_method
    from dist_lora.init.methods import FROM_WEIGHT
    from dist_lora.init.weight import ShardedWeight

    name, niter = weight_method(method)
    weight = ShardedWeight(local, dim, group, rank * local.shape[1] if dim == 1 else 0)
    if group is not None:  # start together: the previous method may have ended at different times
        from dist_lora.parallel.collectives import barrier

        barrier(group)
    start = time.perf_counter()
    FROM_WEIGHT[name](weight, R, ALPHA / R, niter, torch.Generator().manual_seed(1), _config(method))
    return time.perf_counter() - start


def time_peft(method: str, weight) -> float:
    import torch

    from dist_lora.testing.peft_init_reference import peft_init

    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model.lin.weight.copy_(weight)
    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if method == "loftq" else {}
    start = time.perf_counter()
    peft_init(model, r=R, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights=method, **extra)
    return time.perf_counter() - start


def worker(out: str, methods: list[str], shapes: list[str]) -> None:
    """One TP=2 rank: time every (shape, method) on this rank's shard."""
    from dist_lora import parallel
    from dist_lora.layers.sharding import FactorLayout

    groups = parallel.initialize(tensor_parallel=2, seed=1)
    times = {}
    for shape_name in shapes:
        m, n, dim = SHAPES[shape_name]
        local = FactorLayout(dim=dim).local(_weight((m, n)), 2, groups.tp_rank).contiguous()
        for method in methods:
            times[f"{shape_name}|{method}"] = time_ours(method, local, dim, groups.tp_group, groups.tp_rank, 2)
    Path(out, f"rank{groups.tp_rank}.json").write_text(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "weight_init.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.methods, args.shapes)
    rows = []
    for shape_name in args.shapes:  # one TP=2 launch per shape; results written after each
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", __file__,
                   "--worker", tmp, "--methods", *args.methods, "--shapes", shape_name]
            subprocess.run(cmd, check=True, capture_output=True, timeout=3600, cwd=ROOT, env=env)
            ranks = [json.loads(Path(tmp, f"rank{i}.json").read_text()) for i in range(2)]
        m, n, dim = SHAPES[shape_name]
        weight = _weight((m, n))
        for method in args.methods:
            peft_s = time_peft(method, weight)
            tp1 = time_ours(method, weight, None, None, 0, 1)
            tp2 = max(r[f"{shape_name}|{method}"] for r in ranks)
            rows.append((shape_name, f"{m}x{n}", "row" if dim else "column", method, peft_s, tp1, tp2))
            print(rows[-1], flush=True)
            write(args, rows)


def write(args, rows) -> None:
    import torch

    lines = ["# Weight-driven initialisation: dist_lora (TP=1, TP=2) vs PEFT on the full matrix", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weight_init.py "
             + " ".join(f"--{k} {' '.join(v)}" for k, v in (("methods", args.methods), ("shapes", args.shapes))
                        if v != list(METHODS if k == "methods" else SHAPES)) + "`".replace(" `", "`"),
             "", f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), no GPU; "
             f"torch {torch.__version__}, one thread per process; r={R}, float32.", "",
             "| layer | shape [out, in] | TP layout | method | PEFT full (s) | dist_lora TP=1 (s) | dist_lora TP=2 (s) "
             "| PEFT / TP=1 | PEFT / TP=2 |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, shape, layout, method, peft_s, tp1, tp2 in rows:
        lines.append(f"| {name} | {shape} | {layout} | {method} | {peft_s:.2f} | {tp1:.2f} | {tp2:.2f} "
                     f"| {peft_s / tp1:.2f} | {peft_s / tp2:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
