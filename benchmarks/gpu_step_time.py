"""Benchmark: bf16 training step time of Llama-3-8B-shaped layers at TP=1 on one GPU, dist_lora
(Megatron-Core model, LoRA r=16 on every linear layer, float32 adapters) next to PEFT on the
same Hugging Face model.

    python benchmarks/gpu_step_time.py --out step_time.json            # on a CUDA machine
    python benchmarks/gpu_step_time.py --smoke --out /tmp/smoke.json   # tiny shapes on the CPU (checks the script)

The model has Llama-3-8B's layer shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads, head 128,
vocabulary 128256, RoPE theta 500000) with ``--layers`` decoder layers (default 4) and random
weights written once as bf16 safetensors. A step is forward + backward + AdamW on one sequence
batch (``--batch`` x ``--seq`` tokens); the median of ``--steps`` timed steps after ``--warmup``
untimed ones, with ``torch.cuda.synchronize()`` around each. Also reported: peak GPU memory
(``torch.cuda.max_memory_allocated``) and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                 hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")
SMOKE = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=256, max_position_embeddings=256)


def write_model(config: dict, layers: int, out: Path, device: torch.device) -> None:
    """config.json + random bf16 weights (N(0, 0.02^2), norms 1) under Hugging Face Llama names."""
    from safetensors.torch import save_file

    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16, device="cpu")
        else:
            tensors[name] = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02).cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=layers)))


def _timed(step, warmup: int, steps: int, cuda: bool) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tick)
    return times


def dist_lora_steps(base: Path, ids, labels, warmup: int, steps: int, cuda: bool) -> dict:
    import dist_lora as dl
    from dist_lora import models, parallel
    from dist_lora.models.training import finalize_grads, forward_backward

    groups = parallel.initialize()
    model = models.from_pretrained(base, dtype=torch.bfloat16)
    dl.apply_lora(model, dl.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, ids, labels)
        finalize_grads(model)
        optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = _timed(step, warmup, steps, cuda)
    result = {"backend": groups.backend, "device": str(next(model.parameters()).device),
              "adapter_dtype": str(trainable[0].dtype), "trainable": sum(p.numel() for p in trainable),
              "step_s": times, "median_s": statistics.median(times),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    del model, optimizer
    parallel.shutdown()
    return result


def peft_steps(base: Path, ids, labels, warmup: int, steps: int, cuda: bool, device) -> dict:
    import peft
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids, labels = ids.to(device), labels.to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = _timed(step, warmup, steps, cuda)
    return {"adapter_dtype": str(trainable[0].dtype), "trainable": sum(p.numel() for p in trainable),
            "step_s": times, "median_s": statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA GPU: this benchmark times a GPU (use --smoke to check the script on the CPU)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    config = SMOKE if args.smoke else LLAMA3_8B
    seq, steps, warmup = (32, 2, 1) if args.smoke else (args.seq, args.steps, args.warmup)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (args.batch, seq), generator=g)
    labels = ids.roll(-1, dims=1)
    results = {"machine": {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version()},
               "shape": {"layers": args.layers, "batch": args.batch, "seq": seq, **{k: config[k] for k in (
                   "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")}},
               "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "llama3_8b_layers"
        tick = time.perf_counter()
        write_model(config, args.layers, base, device)
        results["write_s"] = time.perf_counter() - tick
        results["dist_lora"] = dist_lora_steps(base, ids, labels, warmup, steps, cuda)
        if not args.no_peft:
            results["peft"] = peft_steps(base, ids, labels, warmup, steps, cuda, device)
    tokens = args.batch * seq
    for key in ("dist_lora", "peft"):
        if key in results:
            results[key]["tokens_per_s"] = tokens / results[key]["median_s"]
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("dist_lora", "peft")}))
    for key in ("dist_lora", "peft"):
        if key in results:
            r = results[key]
            print(f"{key}: median step {r['median_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} tokens/s, "
                  f"peak {r['peak_gib']} GiB, adapters {r['adapter_dtype']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
