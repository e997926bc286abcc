"""``save_pretrained``: a sharded Megatron model written back as a Hugging Face checkpoint.

Tensors are gathered one at a time over TP to TP rank 0 of data-parallel replica 0 of each
pipeline stage, which writes them into safetensors files of at most ``max_shard_size`` bytes,
so a writer holds at most one output file's tensors. A layer's routed experts travel together,
over ETP and then EP, to the same writer (:mod:`dist_lora.models.expert_tensors`). Everything is written to a temporary
directory next to ``path`` and renamed into place at the end: a failed save leaves no partial
checkpoint behind and an existing one untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_lora.checkpoint.atomic import check_target, publish, temporary_sibling
from dist_lora.models.expert_tensors import expert_meta, expert_units, gather_experts
from dist_lora.models.hf_checkpoint import INDEX, SIDE_FILES, SINGLE
from dist_lora.models.layouts import unshard
from dist_lora.models.loading import model_info
from dist_lora.models.mapping import bind
from dist_lora.parallel.agreement import on_every_rank, raise_if_any
from dist_lora.parallel.collectives import all_gather_object, barrier, broadcast_object, gather_to

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _plan_files(stages: list[list[tuple[str, int]]], max_bytes: int) -> list[list[str]]:
    """Pack each stage's (name, nbytes) list, in order, into files of at most ``max_bytes``."""
    files: list[list[str]] = []
    for tensors in stages:
        current, size = [], 0
        for name, nbytes in tensors:
            if current and size + nbytes > max_bytes:
                files.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            files.append(current)
    return files


def save_pretrained(model: torch.nn.Module, path: str | Path, max_shard_size: int = 2 * 1024**3,
                    overwrite: bool = False) -> None:
    """Write ``model`` (sharded over TP / PP / DP) as an HF checkpoint directory at ``path``.

    Collective over all ranks. ``config.json`` is the source checkpoint's, with the saved dtype;
    tokenizer and generation files of the source directory are copied along.
    """
    info = model_info(model)
    groups, spec = info.groups, info.spec
    path = Path(path)
    with on_every_rank(f"saving {path}"):
        check_target(path, overwrite)

    params = dict(model.named_parameters())
    bound = [b for b in bind(spec, params, groups.pp_rank, groups.pp_size, groups.ep_rank, groups.ep_size)
             if b.entry.when != "tied"]
    units = expert_units(bound)  # dense entries one by one; a layer's routed experts together
    meta = []
    for unit in units:
        if isinstance(unit, list):
            meta += expert_meta(unit, params, spec, groups)
            continue
        shard = torch.empty(params[unit.local_name].shape, device="meta")
        fulls = unshard(unit.layout, [shard] * groups.tp_size, spec)
        meta += [(n, t.numel() * params[unit.local_name].element_size()) for n, t in zip(unit.hf_names, fulls)]
    writer = groups.tp_rank == 0 and groups.dp_rank == 0
    everyone = all_gather_object((groups.pp_rank, writer, meta))
    stages = [next(m for pp, w, m in everyone if pp == s and w) for s in range(groups.pp_size)]
    files = _plan_files(stages, max_shard_size)
    single = len(files) == 1
    names = [SINGLE] if single else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    owner = {t: names[i] for i, tensors in enumerate(files) for t in tensors}

    tmp = Path(broadcast_object(str(temporary_sibling(path)) if groups.rank == 0 else None))

    error = None
    pending: dict[str, torch.Tensor] = {}
    mine = [t for t, _ in meta]
    for unit in units:
        if isinstance(unit, list):  # every expert's replica 0 takes part, whatever its dense DP rank
            produced = gather_experts(unit, params, spec, groups)
        elif groups.dp_rank == 0:
            gathered = gather_to(params[unit.local_name].detach(), 0, groups.tp_group)
            produced = {} if gathered is None else dict(zip(unit.hf_names, unshard(unit.layout, gathered, spec)))
        else:
            continue
        pending.update(produced)
        for file in dict.fromkeys(owner[n] for n in produced):
            members = [t for t in mine if owner[t] == file]
            if error is None and all(t in pending for t in members):
                try:
                    save_file({t: pending.pop(t).contiguous() for t in members}, str(tmp / file),
                              metadata={"format": "pt"})
                except OSError as err:
                    error = err
    barrier()
    if groups.rank == 0 and error is None:
        try:
            config = dict(spec.hf_config)
            config["dtype" if "dtype" in config else "torch_dtype"] = _DTYPE_NAMES.get(info.dtype, str(info.dtype))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            if not single:
                total = sum(n for stage in stages for _, n in stage)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(owner.items()))}
                (tmp / INDEX).write_text(json.dumps(index, indent=2))
            for extra in SIDE_FILES:
                if (Path(info.source) / extra).is_file():
                    shutil.copy2(Path(info.source) / extra, tmp / extra)
            publish(tmp, path)
        except OSError as err:
            error = err
    try:
        raise_if_any(error, what=f"saving {path}")
    finally:
        if groups.rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
