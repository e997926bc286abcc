"""Main job until the fine-tuning launcher lands: a tiny Llama, sharded, checked against HF.

    torchrun --standalone --nproc_per_node 2 launch/compare_hf.py --config configs/tiny_llama.json --tp 2

Rank 0 builds the Hugging Face model of ``--config`` with random weights (fixed seed) and saves
it; every rank loads its Megatron shard with ``dist_lora.models.from_pretrained``, computes the
logits of a random batch, and compares them with transformers' forward of the same model. Then
the sharded model is written back with ``save_pretrained`` and compared tensor by tensor with
the original. Exits non-zero if anything differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_lora import models, parallel
from dist_lora.parallel.collectives import barrier, broadcast_object
from dist_lora.testing.tiny import save_tiny


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="HF config.json of the model to build")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    groups = parallel.initialize(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                                 sequence_parallel=args.sequence_parallel)
    workdir = Path(broadcast_object(args.workdir or (tempfile.mkdtemp(prefix="dist_lora_demo_")
                                                     if groups.rank == 0 else None)))
    hf_dir = workdir / "hf"
    if groups.rank == 0:
        save_tiny(args.config, hf_dir, seed=0)
    barrier()

    import json

    from dist_lora.testing.tiny import hf_model

    reference = hf_model(json.loads(Path(args.config).read_text()), seed=0)
    ids = torch.randint(0, reference.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits

    model = models.from_pretrained(hf_dir)
    got = models.logits(model, ids)
    diff = (got - expected).abs().max().item()
    info = model.dist_lora
    print(f"[rank {groups.rank}] {groups.layout}: read {info.bytes_read / 1e6:.2f} MB of "
          f"{sum(p.stat().st_size for p in hf_dir.glob('*.safetensors')) / 1e6:.2f} MB; "
          f"max |logits - transformers| = {diff:.2e}", flush=True)

    out_dir = workdir / "saved"
    models.save_pretrained(model, out_dir, overwrite=True)
    exact = True
    if groups.rank == 0:
        original, saved = load_file(hf_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
        exact = original.keys() == saved.keys() and all(torch.equal(original[k], saved[k]) for k in original)
        print(f"[rank 0] save_pretrained round trip bit-exact: {exact}", flush=True)
    ok = diff <= args.tolerance and exact
    parallel.shutdown()
    if groups.rank == 0:
        print("OK: sharded Megatron model equals transformers" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
