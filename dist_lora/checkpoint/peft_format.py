"""Hugging Face PEFT's adapter format: ``adapter_model.safetensors`` + ``adapter_config.json``.

``export_peft`` writes it from a live sharded model (collective; rank 0 writes) or from a sharded
checkpoint directory (one process, no process group, one global tensor in memory at a time).
Fused Megatron adapters become per-projection adapters sharing one A; vocabulary padding is
cut; only adapter tensors are written (no fused names, no base weights). ``import_peft`` puts a
PEFT LoRA / DoRA adapter onto any layout.

PEFT keeps the default adapter in ``out_dir`` and any other in ``out_dir/<name>``; so do we.
PiSSA / OLoRA adapters export as plain LoRA on the original base with
``path_initial_model_for_weight_conversion`` (see :mod:`dist_lora.checkpoint.initial_conversion`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dist_lora.adapters.hotswap import AUTO, check_fits, prepare_loaded, resolve_hotswap, unwrap_compiled
from dist_lora.adapters.lora import add_adapter
from dist_lora.adapters.registry import require_adapter
from dist_lora.checkpoint.atomic import atomic_directory
from dist_lora.checkpoint.entries import entries, is_training_state
from dist_lora.checkpoint.fuse import fuse_projections
from dist_lora.checkpoint.hotswap import peft_source, swap_in
from dist_lora.checkpoint.initial_conversion import subtract_initial
from dist_lora.checkpoint.peft_names import PREFIX, bias_key, peft_key, split_fused
from dist_lora.checkpoint.sharded import MANIFEST, ShardReader, read_manifest
from dist_lora.checkpoint.state_dict import adapter_state_dict, set_adapter_state_dict
from dist_lora.checkpoint.stream_writer import StreamWriter
from dist_lora.config.lora import LoraConfig
from dist_lora.models.spec import spec_from_config
from dist_lora.parallel.collectives import all_gather_object, group_rank, on_every_rank

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _peft_config(config: LoraConfig, modules: dict[str, tuple[int, float]], saved: list[str],
                 base_model: str | None) -> dict:
    """PEFT config naming exactly the exported modules; ranks / alphas that differ from the
    defaults become explicit ``rank_pattern`` / ``alpha_pattern`` entries. The exported weights
    are final, so the initialisation and its settings (``loftq_config``, ``eva_config``) are not
    carried over."""
    out = config.to_dict()
    out.update(target_modules=sorted(modules), exclude_modules=None, layers_to_transform=None,
               layers_pattern=None, modules_to_save=saved or None, init_lora_weights=True,
               rank_pattern={m: r for m, (r, _) in sorted(modules.items()) if r != config.r},
               alpha_pattern={m: a for m, (_, a) in sorted(modules.items()) if a != config.lora_alpha},
               loftq_config={}, eva_config=None)
    if base_model is not None:
        out["base_model_name_or_path"] = base_model
    return out


def _out_dir(out_dir: Path, adapter_name: str) -> Path:
    return out_dir if adapter_name == "default" else out_dir / adapter_name


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
    ranks = {hf: (e.shape[0], e.alpha) for e in entries(model, adapter_name) if e.role == "lora_A"
             for hf in e.hf_names}
    merged = {}
    for part in all_gather_object(ranks):
        merged.update(part)
    saved = sorted({k[len(PREFIX):-len(".weight")] for k in state if _is_saved_module(k)})
    target = _out_dir(out_dir, adapter_name)
    with on_every_rank(f"exporting to {target}"):
        if group_rank() == 0:
            if initial is not None:
                state, config, merged = subtract_initial(state, config, merged, initial)
            with atomic_directory(target, overwrite) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
                (tmp / CONFIG).write_text(json.dumps(_peft_config(config, merged, saved, base), indent=2, sort_keys=True))
    return target


def _is_saved_module(key: str) -> bool:
    return key.endswith(".weight") and ".lora_" not in key


def _checkpoint_plan(manifest: dict, config: LoraConfig):
    """(plan, ranks, saved): every PEFT tensor of a sharded checkpoint, from the manifest alone."""
    spec = spec_from_config(manifest["model_config"]) if manifest["model_config"] else None
    plan, ranks, saved = [], {}, []
    for key, meta in manifest["tensors"].items():
        if is_training_state(meta["role"]):  # optimizer / method state of a training checkpoint
            continue
        names = tuple(meta["hf_names"])
        shapes = split_fused(meta["fused"], torch.empty(meta["shape"], device="meta"), names, spec,
                             shared=meta["role"] == "lora_A")
        for hf, t in shapes.items():
            out_key = _peft_key_of(meta, hf, config)
            if out_key is not None:
                plan.append((key, hf, out_key, getattr(torch, meta["dtype"]), tuple(t.shape)))
        if meta["role"] == "lora_A":
            ranks.update({hf: (meta["shape"][0], meta["alpha"]) for hf in names})
        if meta["role"] == "modules_to_save":
            saved += list(names)
    plan.sort(key=lambda p: p[2])
    return plan, ranks, sorted(saved), spec


def checkpoint_tensors(path: str | Path):
    """(PEFT config dict, iterator of (PEFT key, tensor)) of a sharded checkpoint, one global
    tensor (and its per-projection split) in memory at a time."""
    manifest = read_manifest(path)
    config = LoraConfig.from_dict(manifest["adapter_config"])
    plan, ranks, saved, spec = _checkpoint_plan(manifest, config)
    reader = ShardReader(Path(path), manifest)

    def tensors():
        current_key, split = None, {}
        for key, hf, out_key, _, _ in plan:
            if key != current_key:
                meta = manifest["tensors"][key]
                split = split_fused(meta["fused"], reader.global_tensor(key), tuple(meta["hf_names"]), spec,
                                    shared=meta["role"] == "lora_A")
                current_key = key
            yield out_key, split[hf].contiguous()

    return _peft_config(config, ranks, saved, None), plan, tensors()


def _export_checkpoint(path: Path, out_dir: Path, base: str | None, overwrite: bool) -> Path:
    """Sharded checkpoint -> PEFT files, in this process, one global tensor at a time."""
    manifest = read_manifest(path)
    config, plan, tensors = checkpoint_tensors(path)
    if base is not None:
        config["base_model_name_or_path"] = base
    target = _out_dir(out_dir, manifest["adapter_name"])
    with atomic_directory(target, overwrite) as tmp:
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
    block-structured, each projection's block carrying its own scaling. Unsupported adapter
    types, modules this model lacks and shape mismatches raise on every rank; ignored config
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
        if fused:
            config, tensors = fuse_projections(model, config, tensors)
        swapping = resolve_hotswap(model, adapter_name, hotswap)
        if not swapping:
            check_fits(model, config, _ranks(tensors), str(peft_dir))
    config.init_lora_weights = True  # the file holds every tensor; the init is overwritten
    if swapping:
        swap_in(model, config, peft_source(model, tensors, str(peft_dir)), adapter_name)
        return
    add_adapter(model, config, adapter_name)
    set_adapter_state_dict(model, tensors, adapter_name)
    prepare_loaded(model, adapter_name)


def _ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """PEFT module -> rank of its A."""
    return {k[len(PREFIX):].rsplit(".lora_", 1)[0]: t.shape[0] for k, t in tensors.items()
            if k.endswith((".lora_A.weight", ".lora_embedding_A"))}
