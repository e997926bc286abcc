"""Benchmark: offline export of a Llama-3-8B-shaped adapter from a TP=8 sharded checkpoint to PEFT.

    .venv/bin/python benchmarks/export_peft.py          # writes benchmarks/results/export_peft.md

The checkpoint is what ``save_adapter`` writes for r=16 per-projection adapters on every linear
layer of Llama-3-8B (32 layers, hidden 4096, 8 KV heads, FFN 14336; ~42M parameters, float32)
at TP=8: 8 shard files and a manifest, built here directly with random values (no 8-process
run of an 8B model is needed to produce the same files). ``dist-lora convert`` (export_peft
from a path) runs in a fresh process; so does a plain copy of the same shard bytes, for the
ratio. Each reports its wall time and peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
R, TP = 16, 8


def build(path: Path) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    from dist_lora.checkpoint.sharded import FORMAT, MANIFEST, sha256_of
    from dist_lora.config.lora import LoraConfig

    c = LLAMA3_8B
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    column = {"linear_qkv": {"q_proj": h, "k_proj": kv, "v_proj": kv}, "linear_fc1": {"gate_proj": f, "up_proj": f}}
    row = {"linear_proj": ("self_attn.o_proj", h, h), "linear_fc2": ("mlp.down_proj", f, h)}
    hf_part = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp"}
    mega_part = {"linear_qkv": "self_attention", "linear_fc1": "mlp", "linear_proj": "self_attention", "linear_fc2": "mlp"}
    g = torch.Generator().manual_seed(0)
    shards = [dict() for _ in range(TP)]
    tensors, params = {}, 0

    def add(key, full, dim, role, hf):
        nonlocal params
        params += full.numel()
        meta = {"shape": list(full.shape), "dim": dim, "stride": 1, "size": None, "dtype": "float32", "role": role,
                "hf_names": [hf], "fused": None, "kind": "linear", "adapted": [], "alpha": 32, "files": {}}
        parts = [full] * TP if dim is None else list(full.chunk(TP, dim))
        for r in range(TP if dim is not None else 1):
            name = f"adapter-tp{r:02d}-pp00.safetensors"
            shards[r][key] = parts[r].contiguous()
            meta["files"][name] = r
        tensors[key] = meta

    for layer in range(c["num_hidden_layers"]):
        for module, projections in column.items():
            for proj, rows in projections.items():
                base = f"decoder.layers.{layer}.{mega_part[module]}.{module}.{proj}"
                hf = f"model.layers.{layer}.{hf_part[proj]}.{proj}"
                add(f"{base}.lora_A", torch.randn(R, h, generator=g), None, "lora_A", hf)
                add(f"{base}.lora_B", torch.randn(rows, R, generator=g), 0, "lora_B", hf)
        for module, (leaf, fan_in, out) in row.items():
            base = f"decoder.layers.{layer}.{mega_part[module]}.{module}.all"
            hf = f"model.layers.{layer}.{leaf}"
            add(f"{base}.lora_A", torch.randn(R, fan_in, generator=g), 1, "lora_A", hf)
            add(f"{base}.lora_B", torch.randn(out, R, generator=g), None, "lora_B", hf)
    path.mkdir(parents=True)
    files = {}
    for r, shard in enumerate(shards):
        name = f"adapter-tp{r:02d}-pp00.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files[name] = {"sha256": sha256_of(path / name)}
    config = LoraConfig(r=R, lora_alpha=32, target_modules="all-linear").to_dict()
    manifest = {"format": FORMAT, "adapter_name": "default", "adapter_config": config, "layout": {"tp": TP, "pp": 1},
                "model_config": LLAMA3_8B, "files": files, "tensors": tensors}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return params, sum((path / n).stat().st_size for n in files)


CHILD = """
import sys, time, shutil
from pathlib import Path
mode, src, dst = sys.argv[1:4]
start = time.perf_counter()
if mode in ("export", "imports"):
    from dist_lora.checkpoint.peft_format import export_peft
    t0 = time.perf_counter()
    if mode == "export":
        export_peft(Path(src), Path(dst))
    seconds = time.perf_counter() - t0
else:
    t0 = time.perf_counter()
    Path(dst).mkdir()
    for f in sorted(Path(src).glob("*.safetensors")):
        shutil.copyfile(f, Path(dst) / f.name)
    seconds = time.perf_counter() - t0
# VmHWM is this process image's peak RSS (ru_maxrss would carry the parent's over exec).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(seconds, hwm / 1024)
"""


def measure(mode: str, src: Path, dst: Path) -> tuple[float, float]:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst)], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    import platform

    import torch

    work = Path(tempfile.mkdtemp(prefix="dist_lora_export_bench_"))
    try:
        params, nbytes = build(work / "ckpt")
        export = min((measure("export", work / "ckpt", work / "peft") for _ in range(2)), key=lambda m: m[0])
        copy = min((measure("copy", work / "ckpt", work / "copy") for _ in range(2)), key=lambda m: m[0])
        imports = measure("imports", work / "ckpt", work / "noop")  # torch + safetensors + dist_lora only
        out_bytes = (work / "peft" / "adapter_model.safetensors").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = [
        "# Offline PEFT export of a Llama-3-8B-shaped adapter from a TP=8 checkpoint", "",
        "Command: `.venv/bin/python benchmarks/export_peft.py`", "",
        f"Machine: {platform.platform()}; {cpu}; {os.cpu_count()} cores; torch {torch.__version__}; no GPU", "",
        f"Adapter: r={R} on q/k/v/o/gate/up/down of 32 layers, {params / 1e6:.1f}M parameters, float32; "
        f"checkpoint {nbytes / 1e6:.1f} MB in {TP} shard files; exported file {out_bytes / 1e6:.1f} MB.", "",
        "| job | wall s | peak RSS MB |", "| --- | --- | --- |",
        f"| export_peft (checkpoint -> adapter_model.safetensors) | {export[0]:.2f} | {export[1]:.0f} |",
        f"| plain copy of the same shard files | {copy[0]:.2f} | {copy[1]:.0f} |", "",
        f"| the export's imports alone (torch, safetensors, dist_lora) | - | {imports[1]:.0f} |", "",
        f"Ratio export / copy: wall {export[0] / copy[0]:.1f}x. Peak RSS of the export above its imports: "
        f"{export[1] - imports[1]:.0f} MB, for a {nbytes / 1e6:.0f} MB checkpoint (largest single tensor "
        f"{14336 * R * 4 / 1e6:.2f} MB).", "",
        "The export holds one global tensor (and its per-projection split) in memory at a time. Its RSS "
        "above the imports is mostly the pages of the memory-mapped shard files it has read (clean page "
        "cache), which the kernel can drop; the copy moves bytes with sendfile and maps nothing. The "
        "wall-time gap is hashing every shard (sha256 check) plus per-tensor slicing and writing.", "",
    ]
    out = ROOT / "benchmarks" / "results" / "export_peft.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
