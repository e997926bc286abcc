"""PEFT adapter -> dist_lora sharded checkpoint for a Megatron layout, offline (no model built).

The family table of the base (only its ``config.json`` is read) says which Megatron layer each
Hugging Face module lives in and how that layer is split; from it every PEFT tensor gets its
layout-independent key and split dim, exactly as ``save_adapter`` would write them for
per-projection adapters. A one-shard checkpoint is assembled and then re-laid for the requested
TP / PP by :func:`reshard_checkpoint`.

Adapters on routed experts (``target_parameters``): PEFT's packed tensors of each layer's fused
expert parameter are unpacked per expert (:mod:`dist_lora.checkpoint.expert_keys`) into the keys
``save_adapter`` writes (``decoder.layers.3.mlp.experts.5.linear_fc1.all.lora_A``, global layer
and expert index), whole (ETP = 1): loading lays them out for any EP / ETP.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from dist_lora.adapters.targets import pattern_value
from dist_lora.checkpoint.expert_keys import ROLES, is_expert_key, peft_expert_key, unpack
from dist_lora.checkpoint.offline_reshard import reshard_checkpoint
from dist_lora.checkpoint.peft_format import read_adapter
from dist_lora.checkpoint.peft_names import PREFIX, hf_module_table
from dist_lora.checkpoint.sharded import FORMAT, MANIFEST, sha256_of
from dist_lora.layers.slots import WHOLE
from dist_lora.models.spec import read_spec

_ROLES = {"lora_A.weight": ("lora_A", "linear"), "lora_B.weight": ("lora_B", "linear"),
          "lora_B.bias": ("lora_bias", "linear"), "lora_magnitude_vector": ("lora_magnitude_vector", "linear"),
          "lora_embedding_A": ("lora_A", "embedding"), "lora_embedding_B": ("lora_B", "embedding"),
          "base_layer.bias": ("trained_bias", "linear")}  # bias="lora_only" only (see below)


def _split_dim(role: str, kind: str, layout: str) -> tuple[int | None, bool]:
    """(split dim, vocabulary-padded) of a tensor of ``role`` on a layer of ``layout``."""
    if role == "lora_A":
        if kind == "embedding":
            return 1, True
        return (1, False) if layout == "row" else (None, False)
    if kind == "embedding" or layout == "row":
        return None, False
    return 0, layout == "vocab"


# (role, Megatron layout of the expert's layer) -> (split dim, stride) over ETP, as ExpertLoraLinear
# lays its factors out: fc1's B like its [gate; up] rows (stride 2), fc2's A like its input columns.
_EXPERT_SPLITS = {("lora_A", "column"): (None, 1), ("lora_B", "column"): (0, 2),
                  ("lora_A", "row"): (1, 1), ("lora_B", "row"): (None, 1)}


def _expert_tensors(config, tensors: dict, spec) -> tuple[dict, dict]:
    """Every routed expert's A and B, unpacked from PEFT's packed tensors, with the metadata
    ``save_adapter`` writes for them; an adapter for another expert count raises ``ValueError``."""
    shard, metas = {}, {}
    if not config.target_parameters:
        return shard, metas
    if spec.experts is None:
        raise ValueError(f"the adapter adapts routed experts (target_parameters={config.target_parameters}), but "
                         f"the base is a dense {spec.family.name} model")
    for entry in spec.family.weights:
        if not entry.per_expert:
            continue
        kind = "column" if entry.layout in ("glu", "gate_up") else "row"
        for g in range(spec.num_layers):
            param = entry.fused[0][0].format(layer=g)
            if not any(param == t or param.endswith(f".{t}") for t in config.target_parameters):
                continue
            r = pattern_value(config.rank_pattern, param, config.r)
            alpha = pattern_value(config.alpha_pattern, param, config.lora_alpha)
            for role in ROLES:
                key = peft_expert_key(param, role, config.target_parameters, spec)
                if key not in tensors:
                    raise ValueError(f"the adapter's target_parameters name {param} but it has no {key}")
                dim, stride = _EXPERT_SPLITS[(role, kind)]
                for e, factor in enumerate(unpack(role, tensors[key], spec.experts.num_experts, r, key)):
                    module = entry.megatron[: -len(".weight")].replace("local_experts.{expert}", "{expert}")
                    out_key = f"{module.format(layer=g, expert=e)}.{WHOLE}.{role}"
                    shard[out_key] = factor.contiguous()
                    metas[out_key] = {"shape": list(factor.shape), "dim": dim, "stride": stride, "size": None,
                                      "dtype": str(factor.dtype)[len("torch."):], "role": role, "hf_names": [param],
                                      "fused": None, "kind": "expert", "adapted": [],
                                      "alpha": alpha, "expert": e, "parallel": "etp",
                                      "files": {"adapter-tp00-pp00.safetensors": 0}}
    return shard, metas


def peft_to_sharded(peft_dir: str | Path, base_dir: str | Path, dst: str | Path, tp: int = 1, pp: int = 1,
                    overwrite: bool = False, first_stage_layers: int | None = None,
                    last_stage_layers: int | None = None) -> Path:
    """Write the PEFT adapter at ``peft_dir`` as a sharded checkpoint for ``tp`` x ``pp`` (with
    the first / last pipeline stage holding ``first_stage_layers`` / ``last_stage_layers``)."""
    config, tensors = read_adapter(peft_dir)
    spec = read_spec(base_dir).with_pipeline(first_stage_layers, last_stage_layers)
    spec.check_layout(tp, pp)
    shard, metas = _expert_tensors(config, tensors, spec)
    table = hf_module_table(spec)
    for key, tensor in sorted(tensors.items()):
        if is_expert_key(key, spec):
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith("base_layer.weight"):  # PEFT's copy of base embedding weights: not adapter state
            continue
        if name == "lm_head.weight":
            out_key, role, kind, module, dim, padded = "output_layer.modules_to_save", "modules_to_save", "linear", "lm_head", 0, True
        else:
            suffix = next((s for s in _ROLES if name.endswith("." + s)), None)
            if suffix is None or (suffix == "base_layer.bias" and config.bias != "lora_only"):
                raise ValueError(f"{key}: only LoRA / DoRA tensors, bias='lora_only' biases and a saved lm_head "
                                 f"can be converted (bias='all' base biases cannot: import the adapter with "
                                 f"import_peft and save it with save_adapter)")
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
                          if role != "modules_to_save" else None,  # as save_adapter: on every LoRA tensor
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
