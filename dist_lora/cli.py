"""The ``dist-lora`` command line.

    dist-lora inspect CKPT                 layout, adapter, ranks, parameter counts, checksums
    dist-lora convert CKPT OUT [--base-model NAME] [--overwrite]
                                           sharded checkpoint -> PEFT adapter directory
    dist-lora convert CKPT OUT --tp N --pp M [--first-stage-layers F] [--last-stage-layers L]
                                           sharded checkpoint -> the same for another layout
    dist-lora convert PEFT_DIR OUT --base HF_DIR [--tp N --pp M] [--first-stage-layers F] [...]
                                           PEFT adapter -> sharded checkpoint
    dist-lora merge --base HF_DIR --adapter ADAPTER --out DIR [--overwrite]
                                           Hugging Face checkpoint with the adapter merged
    dist-lora verify --base HF_DIR --adapter ADAPTER
                                           peft vs dist_lora logits on a sample
    dist-lora convert-gguf FILE.gguf OUT_DIR [--dtype float32] [--overwrite]
                                           GGUF checkpoint -> Hugging Face safetensors directory
                                           with its tokenizer and chat template
    dist-lora tokenize RECIPE [section.key=value ...]
                                           build a recipe's token caches ahead, in one process

Each runs in one process (verify starts a one-rank process group of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from dist_lora import __version__, models, parallel
from dist_lora.checkpoint.entries import is_training_state
from dist_lora.checkpoint.gguf import convert_gguf
from dist_lora.checkpoint.merge_release import merge_release
from dist_lora.checkpoint.offline_reshard import reshard_checkpoint
from dist_lora.checkpoint.peft_format import export_peft, import_peft
from dist_lora.checkpoint.peft_to_sharded import peft_to_sharded
from dist_lora.checkpoint.sharded import MANIFEST, load_adapter, read_manifest, sha256_of
from dist_lora.parallel.agreement import RankError
from dist_lora.recipes.config import load_config
from dist_lora.recipes.data import ensure
from dist_lora.recipes.data.cache import format_options


def _inspect(args) -> int:
    path = Path(args.path)
    manifest = read_manifest(path)
    config = manifest["adapter_config"]
    tensors = {k: m for k, m in manifest["tensors"].items() if not is_training_state(m["role"])}
    params = sum(math.prod(m["shape"]) for m in tensors.values())
    ranks = sorted({m["shape"][0] for m in tensors.values() if m["role"] == "lora_A"})
    print(f"checkpoint   {path}")
    layout = manifest["layout"]
    experts = f" EP={layout['ep']} ETP={layout['etp']}" if layout.get("ep", 1) * layout.get("etp", 1) > 1 else ""
    stages = layout.get("stage_layers")
    stages = f" (layers per stage: {', '.join(map(str, stages))})" if stages else ""
    print(f"layout       TP={layout['tp']} PP={layout['pp']}{experts}{stages}, {len(manifest['files'])} shard files")
    print(f"adapter      {manifest['adapter_name']}: r={config['r']} lora_alpha={config['lora_alpha']} "
          f"dora={config['use_dora']} rslora={config['use_rslora']} ranks used={ranks}")
    print(f"target       {config['target_modules']}")
    if config.get("target_parameters"):
        print(f"experts      {config['target_parameters']} (target_parameters)")
    model = manifest.get("model_config") or {}
    print(f"base model   {model.get('model_type', '?')} hidden={model.get('hidden_size', '?')} "
          f"layers={model.get('num_hidden_layers', '?')}")
    if "training" in manifest:
        t = manifest["training"]
        print(f"training     step {t['step']}, data position {t['data_position']}, {t['optimizer']} state")
    roles = {}
    for meta in tensors.values():
        roles[meta["role"]] = roles.get(meta["role"], 0) + 1
    print(f"tensors      {len(tensors)} ({', '.join(f'{k}: {v}' for k, v in sorted(roles.items()))}), "
          f"{params:,} parameters")
    bad = 0
    for file, info in tqdm(sorted(manifest["files"].items()), desc="verifying", disable=not args.progress):
        ok = (path / file).is_file() and sha256_of(path / file) == info["sha256"]
        bad += not ok
        print(f"  {file}  sha256 {info['sha256'][:16]}…  {'ok' if ok else 'MISMATCH or missing'}")
    if args.json:
        print(json.dumps({"parameters": params, "tensors": len(tensors), "bad_files": bad}))
    return 1 if bad else 0


def _stages(args) -> dict:
    return {"first_stage_layers": args.first_stage_layers, "last_stage_layers": args.last_stage_layers}


def _convert(args) -> int:
    if not (Path(args.src) / MANIFEST).is_file():  # a PEFT adapter directory
        if args.base is None:
            raise ValueError("converting a PEFT adapter to a sharded checkpoint needs --base HF_DIR "
                             "(its config.json gives the Megatron layout)")
        out = peft_to_sharded(args.src, args.base, args.dst, args.tp or 1, args.pp or 1, overwrite=args.overwrite,
                              **_stages(args))
        print(f"wrote sharded checkpoint for TP={args.tp or 1} PP={args.pp or 1} to {out}")
        return 0
    if any(v is not None for v in (args.tp, args.pp, args.first_stage_layers, args.last_stage_layers)):
        out = reshard_checkpoint(args.src, args.dst, args.tp or 1, args.pp or 1, overwrite=args.overwrite,
                                 **_stages(args))
        print(f"wrote sharded checkpoint for TP={args.tp or 1} PP={args.pp or 1} to {out}")
        return 0
    out = export_peft(Path(args.src), Path(args.dst), base_model_name_or_path=args.base_model,
                      overwrite=args.overwrite)
    print(f"wrote PEFT adapter to {out}")
    return 0


def _merge(args) -> int:
    out = merge_release(args.base, args.adapter, args.out, max_shard_size=int(args.max_shard_size_gb * 1024**3),
                        overwrite=args.overwrite, progress=args.progress)
    print(f"wrote merged model to {out}")
    return 0


def _verify(args) -> int:
    """peft and dist_lora on the same base, adapter and sample: the largest logit difference."""
    adapter = Path(args.adapter)
    sharded = (adapter / MANIFEST).is_file()
    tmp = Path(tempfile.mkdtemp(prefix="dist_lora_verify_"))
    try:
        peft_dir = export_peft(adapter, tmp / "peft") if sharded else adapter
        parallel.initialize()
        try:
            model = models.from_pretrained(args.base)
            if sharded and read_manifest(adapter)["model_config"]:
                load_adapter(model, adapter)  # a Megatron checkpoint: load it as the training job would
            else:
                import_peft(model, peft_dir)
            spec = models.model_info(model).spec
            ids = torch.randint(0, spec.vocab_size, (args.batch, args.seq), device="cpu",
                                generator=torch.Generator(device="cpu").manual_seed(args.seed))
            ours = models.logits(model, ids)
        finally:
            parallel.shutdown()
        import peft
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(args.base, attn_implementation="eager", dtype=torch.float32)
        reference = peft.PeftModel.from_pretrained(base, peft_dir).eval()
        with torch.no_grad():
            theirs = reference(ids).logits.float()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    diff = (ours.cpu() - theirs).abs().max().item()  # peft runs on the host
    scale = theirs.abs().max().item()
    verdict = diff <= args.tolerance * max(1.0, scale)
    print(f"max |logits(dist_lora) - logits(peft)| = {diff:.3e} (max |logit| {scale:.3f}) on a "
          f"[{args.batch}, {args.seq}] sample: {'OK' if verdict else 'MISMATCH'}")
    return 0 if verdict else 1


def _convert_gguf(args) -> int:
    out = convert_gguf(args.file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote Hugging Face model (safetensors, {args.dtype}) with its tokenizer to {out}")
    return 0


def _tokenize(args) -> int:
    """The token caches a recipe's job would build (data.path and data.eval_path)."""
    config = load_config(args.recipe, args.overrides)
    d = config.data
    base = config.model.hf_dir  # demo models have no tokenizer of their own: bytes
    for path in [d.path] + ([d.eval_path] if d.eval_path else []):
        try:
            cache = ensure(path, d.format, format_options(d), d.tokenizer, base, d.cache_dir)
        except RankError as err:
            raise ValueError(str(err)) from None
        print(f"{path}: {cache.meta['documents']} documents, {cache.meta['tokens']} tokens in {cache.directory}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-lora", description="dist_lora checkpoint tools")
    parser.add_argument("--version", action="version", version=f"dist-lora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="describe and verify a sharded adapter checkpoint")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="also print a JSON summary line")
    inspect.add_argument("--no-progress", dest="progress", action="store_false")
    convert = sub.add_parser("convert", help="sharded checkpoint -> PEFT adapter, or -> another TP / PP layout")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--tp", type=int, default=None, help="re-lay the checkpoint for this TP size")
    convert.add_argument("--pp", type=int, default=None, help="re-lay the checkpoint for this PP size")
    convert.add_argument("--first-stage-layers", type=int, default=None,
                         help="layers of the first pipeline stage of the new layout (default: even / balanced)")
    convert.add_argument("--last-stage-layers", type=int, default=None,
                         help="layers of the last pipeline stage of the new layout (default: even / balanced)")
    convert.add_argument("--base", default=None, help="HF model directory (PEFT -> sharded: the Megatron layout)")
    convert.add_argument("--base-model", default=None, help="base_model_name_or_path for adapter_config.json")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    merge = sub.add_parser("merge", help="write a Hugging Face checkpoint with an adapter merged in")
    merge.add_argument("--base", required=True, help="Hugging Face model directory (safetensors)")
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory or dist_lora sharded checkpoint")
    merge.add_argument("--out", required=True)
    merge.add_argument("--max-shard-size-gb", type=float, default=5.0)
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.add_argument("--no-progress", dest="progress", action="store_false")
    verify = sub.add_parser("verify", help="compare dist_lora and peft logits for an adapter on a base")
    verify.add_argument("--base", required=True, help="Hugging Face model directory (safetensors)")
    verify.add_argument("--adapter", required=True, help="PEFT adapter directory or dist_lora sharded checkpoint")
    verify.add_argument("--batch", type=int, default=2)
    verify.add_argument("--seq", type=int, default=32)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--tolerance", type=float, default=1e-4, help="allowed max difference, relative to max |logit|")
    gguf = sub.add_parser("convert-gguf", help="GGUF checkpoint -> Hugging Face safetensors directory (+ tokenizer)")
    gguf.add_argument("file", help="a .gguf file (llama, mistral or qwen2 architecture)")
    gguf.add_argument("out", help="the model directory to write")
    gguf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="dtype of the dequantised weights")
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    tokenize = sub.add_parser("tokenize", help="build a recipe's token caches ahead (one process)")
    tokenize.add_argument("recipe", help="recipe YAML")
    tokenize.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    commands = {"inspect": _inspect, "convert": _convert, "merge": _merge, "verify": _verify,
                "convert-gguf": _convert_gguf, "tokenize": _tokenize}
    try:
        return commands[args.command](args)
    except (OSError, ValueError, KeyError) as err:
        print(f"dist-lora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
