"""Hugging Face PEFT's adapter format: ``adapter_model.safetensors`` + ``adapter_config.json``.

``export_peft`` writes it from a live sharded model (collective; rank 0 writes) or from a sharded
checkpoint directory (one process, no process group, one global tensor in memory at a time).
Fused Megatron adapters become per-projection adapters sharing one A; vocabulary padding is
cut; only adapter tensors are written (no fused names, no base weights). ``import_peft`` puts a
PEFT LoRA / DoRA adapter onto any layout.

PEFT keeps the default adapter in ``out_dir`` and any other in ``out_dir/<name>``; so do we. The
default adapter's export replaces only its own two files (atomically, as a pair), so the
sub-folders of other adapters in ``out_dir`` stay; another adapter's sub-folder is written whole.
PiSSA / OLoRA adapters export as plain LoRA on the original base with
``path_initial_model_for_weight_conversion`` (see :mod:`dist_lora.checkpoint.initial_conversion`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dist_lora.adapters.hotswap import AUTO, check_fits, prepare_loaded, resolve_hotswap, unwrap_compiled
from dist_lora.adapters.lora import add_adapter
from dist_lora.adapters.management import delete_adapter
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import require_adapter
from dist_lora.checkpoint.atomic import atomic_directory, atomic_files, recover_files
from dist_lora.checkpoint.entries import entries, is_training_state
from dist_lora.checkpoint.expert_keys import check_expert_shapes, pack, peft_expert_key
from dist_lora.checkpoint.fuse import fuse_projections
from dist_lora.checkpoint.hotswap import peft_source, swap_in
from dist_lora.checkpoint.initial_conversion import subtract_initial
from dist_lora.checkpoint.peft_config import peft_config
from dist_lora.checkpoint.peft_names import PREFIX, bias_key, module_kinds, peft_key, split_fused
from dist_lora.checkpoint.sharded import MANIFEST, ShardReader, read_manifest
from dist_lora.checkpoint.state_dict import adapter_state_dict, set_adapter_state_dict
from dist_lora.checkpoint.stream_writer import StreamWriter
from dist_lora.config.init_names import weight_method
from dist_lora.config.lora import LoraConfig
from dist_lora.models.spec import spec_from_config
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import all_gather_object, group_rank

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _out_dir(out_dir: Path, adapter_name: str) -> Path:
    return out_dir if adapter_name == "default" else out_dir / adapter_name


def adapter_files(directory: str | Path, overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Single-process: a temporary folder whose ``adapter_model.safetensors`` and
    ``adapter_config.json`` replace those of ``directory`` together when the block succeeds;
    everything else in ``directory`` (other adapters' sub-folders, a README) is kept."""
    return atomic_files(directory, (WEIGHTS, CONFIG), overwrite, label="adapter")


@contextlib.contextmanager
def _adapter_output(out_dir: Path, adapter_name: str, overwrite: bool) -> Iterator[Path]:
    """The default adapter's two files in ``out_dir``; another adapter's whole sub-folder."""
    if adapter_name == "default":
        with adapter_files(out_dir, overwrite) as tmp:
            yield tmp
    else:
        with atomic_directory(out_dir / adapter_name, overwrite) as tmp:
            yield tmp


def export_peft(model_or_path, out_dir: str | Path, adapter_name: str = "default",
                base_model_name_or_path: str | None = None, overwrite: bool = False,
                path_initial_model_for_weight_conversion: str | Path | None = None) -> Path:
    """Write the adapter in PEFT's format; returns the directory written.

    ``path_initial_model_for_weight_conversion`` (live models): the directory this function
    wrote right after ``apply_lora`` with PiSSA / OLoRA; the adapter is then written as plain
    LoRA of twice the rank that is valid on the *original* base weights (as PEFT's
    ``save_pretrained`` argument of the same name)."""
    if isinstance(model_or_path, (str, Path)):
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError("path_initial_model_for_weight_conversion needs the live model; pass the model, "
                             "not a checkpoint directory")
        return _export_checkpoint(Path(model_or_path), Path(out_dir), base_model_name_or_path, overwrite)
    return _export_model(model_or_path, Path(out_dir), adapter_name, base_model_name_or_path, overwrite,
                         path_initial_model_for_weight_conversion)


def _export_model(model, out_dir: Path, adapter_name: str, base: str | None, overwrite: bool,
                  initial: str | Path | None = None) -> Path:
    config = require_adapter(model, adapter_name)
    state = adapter_state_dict(model, adapter_name)
    mine = [e for e in entries(model, adapter_name) if e.role == "lora_A"]
    ranks = {hf: (e.shape[0], e.alpha) for e in mine for hf in e.hf_names}
    kinds = {hf: e.kind for e in mine for hf in e.hf_names}
    kinds.update({c.hf_name: c.kind for c in view(model).candidates() if c.slot.fused is None})
    experts = {hf for e in mine if e.kind == "expert" for hf in e.hf_names}
    merged, every_kind, parameters = {}, {}, set()
    for part, part_kinds, names in all_gather_object((ranks, kinds, experts)):
        merged.update(part)
        every_kind.update(part_kinds)
        parameters |= names
    saved = sorted({k[len(PREFIX):-len(".weight")] for k in state if _is_saved_module(k)})
    target = _out_dir(out_dir, adapter_name)
    with on_every_rank(f"exporting to {target}"):
        if group_rank() == 0:
            if initial is not None:
                state, config, merged = subtract_initial(state, config, merged, initial)
            with _adapter_output(out_dir, adapter_name, overwrite) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
                written = peft_config(config, merged, saved, base, every_kind, parameters)
                (tmp / CONFIG).write_text(json.dumps(written, indent=2, sort_keys=True))
    return target


def _is_saved_module(key: str) -> bool:
    return key.endswith(".weight") and ".lora_" not in key


def _checkpoint_plan(manifest: dict, config: LoraConfig):
    """(plan, ranks, saved): every PEFT tensor of a sharded checkpoint, from the manifest alone."""
    spec = spec_from_config(manifest["model_config"]) if manifest["model_config"] else None
    plan, ranks, saved, experts = [], {}, [], {}
    kinds = module_kinds(spec) if spec is not None else {}
    for key, meta in manifest["tensors"].items():
        if is_training_state(meta["role"]):  # optimizer / method state of a training checkpoint
            continue
        names = tuple(meta["hf_names"])
        if meta["kind"] == "expert":  # packed with the layer's other experts below
            experts.setdefault((names[0], meta["role"]), {})[meta["expert"]] = key
            if meta["role"] == "lora_A":
                ranks[names[0]] = (meta["shape"][0], meta["alpha"])
            continue
        shapes = split_fused(meta["fused"], torch.empty(meta["shape"], device="meta"), names, spec,
                             shared=meta["role"] == "lora_A")
        for hf, t in shapes.items():
            out_key = _peft_key_of(meta, hf, config)
            if out_key is not None:
                plan.append((key, hf, out_key, getattr(torch, meta["dtype"]), tuple(t.shape)))
        if meta["role"] == "lora_A":
            ranks.update({hf: (meta["shape"][0], meta["alpha"]) for hf in names})
            for hf in names:
                kinds.setdefault(hf, meta["kind"])
        if meta["role"] == "modules_to_save":
            saved += list(names)
    for (param, role), keys in experts.items():
        ordered = tuple(keys[e] for e in range(spec.experts.num_experts))  # every expert is in the checkpoint
        metas = [manifest["tensors"][k] for k in ordered]
        shape = metas[0]["shape"]
        packed = [shape[0] * len(ordered), shape[1]] if role == "lora_A" else [shape[0], shape[1] * len(ordered)]
        plan.append((ordered, param, peft_expert_key(param, role, config.target_parameters or [], spec),
                     getattr(torch, metas[0]["dtype"]), tuple(packed)))
    plan.sort(key=lambda p: p[2])
    return plan, ranks, sorted(saved), spec, kinds, {param for param, _ in experts}


def checkpoint_tensors(path: str | Path):
    """(PEFT config dict, iterator of (PEFT key, tensor)) of a sharded checkpoint, one global
    tensor (and its per-projection split) in memory at a time."""
    manifest = read_manifest(path)
    config = LoraConfig.from_dict(manifest["adapter_config"])
    plan, ranks, saved, spec, kinds, parameters = _checkpoint_plan(manifest, config)
    reader = ShardReader(Path(path), manifest)

    def tensors():
        current_key, split = None, {}
        for key, hf, out_key, _, _ in plan:
            if isinstance(key, tuple):  # a routed expert parameter: every expert's factor, packed
                role = manifest["tensors"][key[0]]["role"]
                yield out_key, pack(role, [reader.global_tensor(k) for k in key]).contiguous()
                continue
            if key != current_key:
                meta = manifest["tensors"][key]
                split = split_fused(meta["fused"], reader.global_tensor(key), tuple(meta["hf_names"]), spec,
                                    shared=meta["role"] == "lora_A")
                current_key = key
            yield out_key, split[hf].contiguous()

    return peft_config(config, ranks, saved, None, kinds, parameters), plan, tensors()


def _export_checkpoint(path: Path, out_dir: Path, base: str | None, overwrite: bool) -> Path:
    """Sharded checkpoint -> PEFT files, in this process, one global tensor at a time."""
    manifest = read_manifest(path)
    config, plan, tensors = checkpoint_tensors(path)
    if base is not None:
        config["base_model_name_or_path"] = base
    target = _out_dir(out_dir, manifest["adapter_name"])
    with _adapter_output(out_dir, manifest["adapter_name"], overwrite) as tmp:
        with StreamWriter(tmp / WEIGHTS, [(k, d, s) for _, _, k, d, s in plan], metadata={"format": "pt"}) as writer:
            for key, tensor in tensors:
                writer.write(key, tensor)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return target


def _peft_key_of(meta: dict, hf: str, config: LoraConfig) -> str | None:
    role = meta["role"]
    if role == "modules_to_save":
        return f"{PREFIX}{hf}.weight"
    if role == "base_bias":
        if config.bias == "lora_only" and hf not in meta["adapted"]:
            return None
        return bias_key(hf, hf in meta["adapted"])
    return peft_key(hf, meta["kind"], role)


def read_peft(peft_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT adapter directory's config and tensors (safetensors only; pickles are refused)."""
    peft_dir = Path(peft_dir)
    if peft_dir.is_dir():
        recover_files(peft_dir, (WEIGHTS, CONFIG), "adapter")  # an export a crash interrupted
    config_file = peft_dir / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; expected a PEFT adapter directory")
    raw = json.loads(config_file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type={raw.get('peft_type')!r} is not supported; dist_lora imports LORA adapters")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = LoraConfig.from_dict(raw)
    for w in caught:
        warnings.warn(f"{peft_dir}: {w.message}", stacklevel=2)
    weights = peft_dir / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in peft_dir.glob("*.bin"))
        hint = f"; found {pickles}, which dist_lora never unpickles" if pickles else ""
        raise FileNotFoundError(f"{weights} does not exist{hint}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except SafetensorError as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    return config, tensors


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Config and PEFT-keyed tensors of a PEFT directory or a dist_lora sharded checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        config, _, tensors = checkpoint_tensors(path)
        return LoraConfig.from_dict(config), dict(tensors)
    return read_peft(path)


def import_peft(model, peft_dir: str | Path, adapter_name: str = "default", fused: bool = False,
                hotswap: bool | str = AUTO) -> None:
    """Load a PEFT LoRA / DoRA adapter onto ``model`` (any TP / PP layout).

    By default each HF projection gets its own adapter (q_proj-only adapters stay q_proj-only).
    ``fused=True`` turns the q/k/v (gate/up) adapters of each layer into one adapter on the fused
    Megatron layer, exactly: A is the stack of their A's (rank = the sum of their ranks) and B is
    block-structured, each projection's block carrying its own scaling. Adapters on routed
    experts (PEFT's ``target_parameters``) are unpacked per expert onto their EP / ETP shards.
    Unsupported adapter types, modules this model lacks, shape mismatches and an adapter for
    another expert count raise on every rank and leave the model as it was; ignored config
    fields give a warning.

    ``hotswap=True`` copies the adapter into the loaded adapter ``adapter_name`` in place (no
    parameter is allocated or replaced; see :mod:`dist_lora.adapters.hotswap` for the limits);
    ``"auto"`` (default) does so when :func:`~dist_lora.adapters.hotswap.enable_hotswap` was
    called and ``adapter_name`` exists, as Transformers' ``load_adapter`` does. A new adapter
    loaded after ``enable_hotswap`` is padded to its ``target_rank``.
    """
    model = unwrap_compiled(model)
    config, tensors, swapping = None, None, False
    with on_every_rank(f"importing {peft_dir}"):
        config, tensors = read_peft(peft_dir)
        check_expert_shapes(config, tensors, view(model).spec)  # before the model changes
        if fused:
            config, tensors = fuse_projections(model, config, tensors)
        swapping = resolve_hotswap(model, adapter_name, hotswap)
        if not swapping:
            check_fits(model, config, _ranks(tensors), str(peft_dir))
    if weight_method(config.init_lora_weights) is not None:
        # The file holds every tensor, valid on the base as it is: a weight-driven init must not
        # rewrite the base. Every other field stays as written (an export writes it back).
        config.init_lora_weights, config.loftq_config = True, {}
    if swapping:
        swap_in(model, config, peft_source(model, tensors, str(peft_dir)), adapter_name)
        return
    add_adapter(model, config, adapter_name)
    try:
        set_adapter_state_dict(model, tensors, adapter_name)
    except BaseException:  # raised on every rank: take the new adapter out again everywhere
        delete_adapter(model, adapter_name)
        raise
    prepare_loaded(model, adapter_name)


def _ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """PEFT module -> rank of its A."""
    return {k[len(PREFIX):].rsplit(".lora_", 1)[0]: t.shape[0] for k, t in tensors.items()
            if k.endswith((".lora_A.weight", ".lora_embedding_A"))}
