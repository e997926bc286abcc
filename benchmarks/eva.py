"""Benchmark: EVA's incremental PCA on Llama-3-8B layer shapes, dist_lora (TP=1, TP=2) against PEFT.

    .venv/bin/python benchmarks/eva.py          # writes benchmarks/results/eva.md

For each weight shape [out, in] of Llama-3-8B (q_proj 4096x4096, k/v_proj 1024x4096, gate/up_proj
14336x4096, down_proj 4096x14336, and o_proj 4096x4096 as the second row-parallel case) EVA
fits the layer's *input* [tokens, in]: r=16, rho=2 (32 components), BATCHES batches of TOKENS
tokens of synthetic activations with a decaying spectrum (like real ones). In one run:

* PEFT: ``peft.utils.incremental_pca.IncrementalPCA(lowrank=True, lowrank_seed=42)``, what
  ``peft``'s EVA hook runs per batch, in this process (1 thread);
* dist_lora TP=1: ``ShardedIncrementalPCA`` in this process (1 thread);
* dist_lora TP=2: two gloo processes (1 thread each). Column layers run sequence parallel (each
  rank holds half of the tokens; without SP their input is replicated and nothing is sent);
  row layers hold half of the features.

Reported: wall seconds of the fastest batch after the first (rank 0, between barriers), bytes each rank sent in EVA's
collectives per batch, the raw activations of one batch (what PEFT's ``gather_distributed_inputs``
all-gathers from every rank), and the smallest principal-angle cosine between dist_lora's and
PEFT's 32 components after the last batch.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [("q_proj", 4096, 4096, "column"), ("k_proj / v_proj", 1024, 4096, "column"),
          ("gate_proj / up_proj", 14336, 4096, "column"), ("down_proj", 4096, 14336, "row"),
          ("o_proj", 4096, 4096, "row")]
K, TOKENS, BATCHES, TAU = 32, 1024, 4, 0.99


def batch(i: int, features: int) -> torch.Tensor:
    """[TOKENS, features] with singular values decaying like 1 / (1 + j / 8)."""
    g = torch.Generator().manual_seed(1000 * i + features)
    basis = torch.linalg.qr(torch.randn(features, 256, generator=torch.Generator().manual_seed(features)))[0]
    scale = 1.0 / (1.0 + torch.arange(256) / 8.0)
    return (torch.randn(TOKENS, 256, generator=g) * scale) @ basis.T + 0.01 * torch.randn(TOKENS, features, generator=g)


def subspace_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb).min().item()


def run_peft(features: int):
    from peft.utils.incremental_pca import IncrementalPCA

    pca = IncrementalPCA(n_components=K, copy=True, lowrank=True, lowrank_seed=42)
    data = [batch(i, features) for i in range(BATCHES)]
    return _timed(pca.partial_fit, data), pca.components_


def run_ours_tp1(features: int):
    from dist_lora.eva.svd import ShardedIncrementalPCA

    pca = ShardedIncrementalPCA(K, TAU)
    data = [batch(i, features) for i in range(BATCHES)]
    return _timed(pca.partial_fit, data), pca.components


def _timed(step, data, sync=lambda: None) -> float:
    """Fastest batch after the first (the machine is shared; the minimum is the least disturbed)."""
    times = []
    for x in data:
        sync()
        start = time.perf_counter()
        step(x)
        sync()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _worker(rank: int, port: int, path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dist_lora.eva.svd import CommMeter, ShardedIncrementalPCA
    from dist_lora.parallel import initialize
    from dist_lora.parallel.collectives import all_gather_tensors, barrier

    groups = initialize(tensor_parallel=2, sequence_parallel=True)
    out = {}
    for name, _, features, kind in SHAPES:
        meter = CommMeter()
        rows, cols = ([], groups.tp_group) if kind == "row" else ([groups.tp_group], None)
        pca = ShardedIncrementalPCA(K, TAU, rows, cols, meter=meter)
        data = [batch(i, features) for i in range(BATCHES)]
        data = [x.chunk(2, dim=1 if kind == "row" else 0)[rank].contiguous() for x in data]
        seconds = _timed(pca.partial_fit, data, lambda: barrier(groups.tp_group))
        parts = all_gather_tensors(pca.components, groups.tp_group)
        components = torch.cat(parts, dim=1) if kind == "row" else parts[0]
        out[name] = (seconds, meter.bytes / BATCHES, components)
    if rank == 0:
        torch.save(out, path)


def run_ours_tp2():
    import tempfile

    import torch.multiprocessing as mp

    from dist_lora.parallel.launch_env import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/tp2.pt"
        procs = [ctx.Process(target=_worker, args=(r, port, path)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"TP=2 workers failed: exit codes {[p.exitcode for p in procs]}")
        return torch.load(path)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    tp2 = run_ours_tp2()
    for name, out, features, kind in SHAPES:
        peft_s, peft_c = run_peft(features)
        tp1_s, tp1_c = run_ours_tp1(features)
        tp2_s, tp2_bytes, tp2_c = tp2[name]
        raw = TOKENS * features * 4
        rows.append(f"| {name} | {out}x{features} | {kind} | {peft_s:.2f} | {tp1_s:.2f} ({tp1_s / peft_s:.2f}x) | "
                    f"{tp2_s:.2f} ({tp2_s / peft_s:.2f}x) | {tp2_bytes / 1e6:.2f} | {raw / 1e6:.1f} | "
                    f"{tp2_bytes / raw:.3f} | {subspace_cos(tp1_c, peft_c):.5f} / {subspace_cos(tp2_c, peft_c):.5f} |")
        print(rows[-1], flush=True)
    text = [
        "# EVA incremental PCA on Llama-3-8B layer shapes: dist_lora TP=1 / TP=2 against PEFT",
        "",
        "Command: `.venv/bin/python benchmarks/eva.py`",
        "",
        f"Machine: {platform.platform()}; {os.cpu_count()} cores; torch {torch.__version__}; no GPU. "
        "Every process runs 1 thread (TP=2: two processes, gloo).",
        "",
        f"Per layer: {K} components (r=16, rho=2), {BATCHES} batches of {TOKENS} tokens, float32 inputs; "
        "seconds: fastest batch after the first; bytes: mean per batch. Column layers at TP=2 run sequence parallel (half the tokens per "
        "rank); row layers hold half the features.",
        "",
        "| layer | weight | TP kind | PEFT s | dist_lora TP=1 s (ratio) | dist_lora TP=2 s (ratio) | "
        "TP=2 bytes sent / rank MB | raw activations of the batch MB | sent / raw | subspace cos vs PEFT (TP=1 / TP=2) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Bytes are what one rank passes to EVA's collectives (all-reduce payloads, float64). Column layers "
        "under SP (tokens split over the 2 ranks): the batch statistics (2 x in + 1 values), then 5 subspace-"
        "iteration products [in, 2k] and a [2k, 2k] Gram: 10.6 MB for in = 4096 whatever the number of "
        "tokens. Row layers (features split): [m, 2k] range-finder products (m = tokens + k + 1; 5 of them), a "
        "[2k, 2k] Gram and k-sized sign / cosine vectors; with DP > 1 also the [in/p, 2k] subspace products "
        "over DP. Column layers without SP send nothing over TP (their input is replicated). PEFT with "
        "`gather_distributed_inputs=True` all-gathers the raw activations instead (each rank sends its share "
        "of the 'raw activations' column and receives the rest), then repeats the same decomposition on every "
        "rank. At this short batch (1024 tokens) the column-layer sketch is 0.63 of the raw batch; it does "
        "not grow with tokens, so at 16k tokens per batch it is 0.04 (10.6 MB against 268 MB).",
        "",
        "Timings share 2 cores with other jobs (fastest batch reported); TP=2 runs two processes on them.",
    ]
    out = ROOT / "benchmarks" / "results" / "eva.md"
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
