"""PEFT adapter -> dist_lora sharded checkpoint for a Megatron layout, offline (no model built).

The family table of the base (only its ``config.json`` is read) says which Megatron layer each
Hugging Face module lives in and how that layer is split; from it every PEFT tensor gets its
layout-independent key and split dim, exactly as ``save_adapter`` would write them for
per-projection adapters. A one-shard checkpoint is assembled and then re-laid for the requested
TP / PP by :func:`reshard_checkpoint`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from dist_lora.adapters.targets import pattern_value
from dist_lora.checkpoint.offline_reshard import reshard_checkpoint
from dist_lora.checkpoint.peft_format import read_adapter
from dist_lora.checkpoint.peft_names import PREFIX, hf_module_table
from dist_lora.checkpoint.sharded import FORMAT, MANIFEST, sha256_of
from dist_lora.models.spec import read_spec

_ROLES = {"lora_A.weight": ("lora_A", "linear"), "lora_B.weight": ("lora_B", "linear"),
          "lora_B.bias": ("lora_bias", "linear"), "lora_magnitude_vector": ("lora_magnitude_vector", "linear"),
          "lora_embedding_A": ("lora_A", "embedding"), "lora_embedding_B": ("lora_B", "embedding")}


def _split_dim(role: str, kind: str, layout: str) -> tuple[int | None, bool]:
    """(split dim, vocabulary-padded) of a tensor of ``role`` on a layer of ``layout``."""
    if role == "lora_A":
        if kind == "embedding":
            return 1, True
        return (1, False) if layout == "row" else (None, False)
    if kind == "embedding" or layout == "row":
        return None, False
    return 0, layout == "vocab"


def peft_to_sharded(peft_dir: str | Path, base_dir: str | Path, dst: str | Path, tp: int = 1, pp: int = 1,
                    overwrite: bool = False, first_stage_layers: int | None = None,
                    last_stage_layers: int | None = None) -> Path:
    """Write the PEFT adapter at ``peft_dir`` as a sharded checkpoint for ``tp`` x ``pp`` (with
    the first / last pipeline stage holding ``first_stage_layers`` / ``last_stage_layers``)."""
    config, tensors = read_adapter(peft_dir)
    spec = read_spec(base_dir).with_pipeline(first_stage_layers, last_stage_layers)
    spec.check_layout(tp, pp)
    table = hf_module_table(spec)
    shard, metas = {}, {}
    for key, tensor in sorted(tensors.items()):
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith("base_layer.weight"):  # PEFT's copy of base embedding weights: not adapter state
            continue
        if name == "lm_head.weight":
            out_key, role, kind, module, dim, padded = "output_layer.modules_to_save", "modules_to_save", "linear", "lm_head", 0, True
        else:
            suffix = next((s for s in _ROLES if name.endswith("." + s)), None)
            if suffix is None:
                raise ValueError(f"{key}: only LoRA / DoRA tensors and a saved lm_head can be converted "
                                 f"(trained base biases cannot)")
            module = name[: -len(suffix) - 1]
            if module not in table:
                raise ValueError(f"{key}: module {module!r} does not exist in a {spec.family.name} model")
            role, kind = _ROLES[suffix]
            megatron, layout, fused = table[module]
            dim, padded = _split_dim(role, kind, layout)
            out_key = f"{megatron}.{module.rsplit('.', 1)[1] if fused else 'all'}.{role}"
        shard[out_key] = tensor.contiguous()
        metas[out_key] = {"shape": list(tensor.shape), "dim": dim, "stride": 1,
                          "size": tensor.shape[dim] if padded else None, "dtype": str(tensor.dtype)[len("torch."):],
                          "role": role, "hf_names": [module], "fused": None, "kind": kind, "adapted": [],
                          "alpha": pattern_value(config.alpha_pattern, module, config.lora_alpha)
                          if role == "lora_A" else None,
                          "files": {"adapter-tp00-pp00.safetensors": 0}}
    work = Path(tempfile.mkdtemp(prefix="dist_lora_convert_"))
    try:
        single = work / "tp1"
        single.mkdir()
        save_file(shard, str(single / "adapter-tp00-pp00.safetensors"), metadata={"format": "pt"})
        manifest = {"format": FORMAT, "adapter_name": "default", "adapter_config": config.to_dict(),
                    "layout": {"tp": 1, "pp": 1}, "model_config": spec.hf_config,
                    "files": {"adapter-tp00-pp00.safetensors": {"sha256": sha256_of(single / "adapter-tp00-pp00.safetensors")}},
                    "tensors": metas}
        (single / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return reshard_checkpoint(single, dst, tp, pp, overwrite=overwrite, first_stage_layers=first_stage_layers,
                                  last_stage_layers=last_stage_layers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
