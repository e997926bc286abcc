"""Merged release: a Hugging Face checkpoint with an adapter folded into its base weights.

The base is streamed tensor by tensor (one base tensor and its merged copy in memory); the
adapter (a PEFT directory or a dist_lora sharded checkpoint) is small and read whole. Merging
follows PEFT's ``merge_and_unload``: ``W + s B A`` (LoRA / rsLoRA, per-module rank and alpha),
``m / ||W + s B A||_row * (W + s B A)`` (DoRA), ``E + s (B A)^T`` (embeddings), ``lora_B.bias``
into the base bias, ``modules_to_save`` and trained base biases replacing the originals, and
on routed experts each expert's ``s B_e A_e`` (:mod:`dist_lora.checkpoint.expert_merge`). A
tied base whose head or embedding the adapter changes is released untied (``lm_head.weight``
written, ``tie_word_embeddings: false``), so it loads with the trained model's logits. The
output is sharded into files of at most ``max_shard_size`` bytes with an index when it needs
more than one, and appears atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from dist_lora.checkpoint.atomic import atomic_directory
from dist_lora.checkpoint.expert_merge import expert_deltas
from dist_lora.checkpoint.peft_format import read_adapter
from dist_lora.checkpoint.peft_names import PREFIX, adapter_modules
from dist_lora.checkpoint.stream_writer import StreamWriter
from dist_lora.models.hf_checkpoint import INDEX, SIDE_FILES, SINGLE, HFCheckpoint
from dist_lora.models.spec import spec_from_config


def _replacements(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base tensors an adapter replaces outright: modules_to_save weights and trained biases."""
    out = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".lora_" in name or name.endswith("base_layer.weight"):
            continue
        out[name.replace(".base_layer.bias", ".bias")] = tensor
    return out


def merged_tensor(name: str, weight: torch.Tensor, modules: dict, replace: dict) -> torch.Tensor:
    """The released value of base tensor ``name``."""
    if name in replace:
        return replace[name].to(weight.dtype)
    module, _, leaf = name.rpartition(".")
    parts = modules.get(module)
    if parts is None:
        return weight
    s = parts["scaling"]
    if leaf == "bias":
        return (weight.float() + s * parts["lora_bias"].float()).to(weight.dtype) if "lora_bias" in parts else weight
    w = weight.float()
    if "emb_A" in parts:
        return (w + s * (parts["emb_B"].float() @ parts["emb_A"].float()).t()).to(weight.dtype)
    merged = w + s * (parts["B"].float() @ parts["A"].float())
    if "m" in parts:
        norm = torch.linalg.norm(merged, dim=1)
        merged = (parts["m"].float() / norm).unsqueeze(1) * merged
    return merged.to(weight.dtype)


def merge_release(base_dir: str | Path, adapter: str | Path, out_dir: str | Path,
                  max_shard_size: int = 5 * 1024**3, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``base_dir`` with ``adapter`` merged into ``out_dir``; returns ``out_dir``."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config, tensors = read_adapter(adapter)
    base_config = json.loads((base_dir / "config.json").read_text())
    reader = HFCheckpoint(base_dir)
    names = reader.names()
    source = {n: n for n in names}  # released tensor -> base tensor it starts from
    spec = spec_from_config(base_config) if config.target_parameters else None
    experts, used = expert_deltas(config, tensors, spec, set(names))
    tensors = {k: v for k, v in tensors.items() if k not in used}
    modules, replace = adapter_modules(config, tensors), _replacements(tensors)
    touched = list(modules) + [n.rpartition(".")[0] for n in replace]
    if base_config.get("tie_word_embeddings", False) and any(m.endswith(("lm_head", "embed_tokens")) for m in touched):
        base_config = _untie(base_config, names, source)
    unknown = sorted(m for m in modules if f"{m}.weight" not in names)
    if unknown:
        raise ValueError(f"the adapter targets modules the base does not have: {unknown[:5]}")
    sizes = {n: _nbytes(reader, source[n]) for n in names}
    files, current, size = [], [], 0
    for name in names:
        if current and size + sizes[name] > max_shard_size:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += sizes[name]
    files.append(current)
    file_names = [SINGLE] if len(files) == 1 else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                                                    for i in range(len(files))]
    with atomic_directory(out_dir, overwrite) as tmp:
        bar = tqdm(total=len(names), desc="merging", unit="tensor", disable=not progress)
        for file, members in zip(file_names, files):
            entries = [(n, _torch_dtype(reader.dtype_name(source[n])), reader.shape(source[n])) for n in members]
            with StreamWriter(tmp / file, entries, metadata={"format": "pt"}) as writer:
                for name in members:
                    weight = reader.read(source[name])
                    if name in experts:  # a routed expert's tensor
                        merged = (weight.float() + experts[name]()).to(weight.dtype)
                    else:
                        merged = merged_tensor(name, weight, modules, replace)
                    writer.write(name, merged.contiguous())
                    bar.update()
        bar.close()
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: f for f, members in zip(file_names, files) for n in members}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(base_config, indent=2))
        for extra in SIDE_FILES:
            if (base_dir / extra).is_file():
                shutil.copy2(base_dir / extra, tmp / extra)
    return out_dir


def _untie(base_config: dict, names: list[str], source: dict[str, str]) -> dict:
    """A tied base whose head or embedding the adapter changes is released untied, as PEFT's
    merge of a saved head and ``merge_and_unload`` here do: ``lm_head.weight`` starts from the
    embedding and the config says ``tie_word_embeddings: false``."""
    embedding = next((n for n in names if n.endswith("embed_tokens.weight")), None)
    if embedding is None:
        raise ValueError("the base ties lm_head to its embedding but has no embed_tokens.weight to untie it from")
    if "lm_head.weight" not in names:
        names.append("lm_head.weight")
        source["lm_head.weight"] = embedding
    return {**base_config, "tie_word_embeddings": False}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"base tensors of dtype {name} are not supported in a merged release")
    return _DTYPES[name]


def _nbytes(reader: HFCheckpoint, name: str) -> int:
    itemsize = torch.empty((), dtype=_torch_dtype(reader.dtype_name(name)), device="meta").element_size()
    return int(torch.Size(reader.shape(name)).numel()) * itemsize
