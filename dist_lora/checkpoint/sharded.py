"""Sharded adapter checkpoints: one safetensors file per (TP, PP) shard plus ``manifest.json``.

Layout of a checkpoint directory::

    manifest.json                      format, layout, adapter config, source model config,
                                       every tensor's global shape / split dim / stride / dtype,
                                       and each file's sha256
    adapter-tp00-pp00.safetensors      TP rank 0 of stage 0: its shards + the replicated tensors
    adapter-tp01-pp00.safetensors      ...

Only data-parallel replica 0 writes. With routed experts, replica 0 of every expert (its
expert-data-parallel rank 0) writes the expert's tensors, split over its ETP group (a tensor's
``parallel`` is ``etp``), and files are named by expert-parallel and ETP rank too
(``adapter-tp00-pp00-ep01-etp00.safetensors``). The directory is written under a temporary name, fsynced
and renamed, so a crash leaves the previous checkpoint as it was. Loading works on any TP / PP
layout: each rank opens only the files that hold slices it needs, checks their sha256, and
reads only the overlapping slices.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dist_lora.adapters.hotswap import AUTO, check_fits, prepare_loaded, resolve_hotswap, unwrap_compiled
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import existing, require_adapter
from dist_lora.checkpoint.atomic import check_target, publish, recover, temporary_sibling
from dist_lora.checkpoint.entries import Entry, entries, is_training_state
from dist_lora.checkpoint.hotswap import CheckpointTensors, swap_in
from dist_lora.checkpoint.methods import add_from_config, config_from_dict
from dist_lora.checkpoint.reshard import overlaps, padded_extent, pieces
from dist_lora.config.lora import LoraConfig
from dist_lora.models.spec import spec_from_config
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import all_gather_object, broadcast_object, group_rank

FORMAT = "dist_lora.adapter_checkpoint/1"
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _saved_parts(manifest: dict, meta: dict) -> int:
    """Into how many parts the checkpoint split a tensor: the TP size, or a routed expert's ETP size."""
    return manifest["layout"].get(meta.get("parallel", "tp"), 1)


def _extent(meta: dict, tp: int) -> int:
    dim = meta["dim"]
    return padded_extent(meta["shape"][dim], tp, meta["stride"], meta["size"] is not None)


def save_adapter(model, path: str | Path, adapter_name: str = "default", overwrite: bool = False) -> None:
    """Write ``adapter_name`` of a (sharded) model as a sharded checkpoint at ``path``.

    Collective over all ranks. Raises on every rank, leaving ``path`` untouched, on failure.
    """
    write_sharded(model, path, adapter_name, entries(model, adapter_name), overwrite)


def write_sharded(model, path: str | Path, adapter_name: str, mine: list[Entry], overwrite: bool,
                  rank_files: dict[str, dict[str, torch.Tensor]] | None = None,
                  extra: dict | None = None) -> None:
    """Collective: write ``mine`` (this rank's entries) as shard files plus the manifest.

    ``rank_files``: per-rank safetensors files written by every rank (not only DP replica 0),
    e.g. RNG states; ``extra``: JSON-serialisable additions to the manifest (written by rank 0).
    """
    path = Path(path)
    config = require_adapter(model, adapter_name)
    lay = view(model).layout()
    with on_every_rank(f"saving to {path}"):
        if group_rank() == 0:
            check_target(path, overwrite)
    tmp = Path(broadcast_object(str(temporary_sibling(path)) if group_rank() == 0 else None))
    try:
        # replica 0 stores: of the dense tensors DP rank 0, of a routed expert's its EDP rank 0
        writer = {"tp": lay["dp_rank"] == 0, "etp": lay["edp_rank"] == 0}
        stored = [e for e in mine if writer[e.parallel] and not e.replica]
        file = f"adapter-tp{lay['tp_rank']:02d}-pp{lay['pp_rank']:02d}"
        if lay["ep"] * lay["etp"] > 1:
            file += f"-ep{lay['ep_rank']:02d}-etp{lay['etp_rank']:02d}"
        file += ".safetensors"
        digests = {}
        with on_every_rank(f"saving to {path}"):
            if stored:
                save_file({e.key: e.param.detach().contiguous() for e in stored}, str(tmp / file),
                          metadata={"format": "pt"})
                digests[file] = sha256_of(tmp / file)
            for name, tensors in (rank_files or {}).items():
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
                digests[name] = sha256_of(tmp / name)
        parts = all_gather_object((file, digests, [(e.key, e.describe(), e.rank) for e in stored]))
        with on_every_rank(f"saving to {path}"):
            if group_rank() == 0:
                _write_manifest(tmp, parts, config, adapter_name, lay, extra or {})
                publish(tmp, path)
    finally:
        if group_rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _layout(lay: dict) -> dict:
    """The manifest's layout: TP and PP sizes, the layers of each stage when PP > 1 and the
    expert EP / ETP sizes of a mixture-of-experts model (informational: loading places tensors by their global layer index, on any layout)."""
    out = {"tp": lay["tp"], "pp": lay["pp"]}
    if lay["pp"] > 1:
        out["stage_layers"] = lay["stage_layers"]
    if lay["ep"] * lay["etp"] > 1:  # the expert layout, only where there is one (dense manifests as before)
        out.update(ep=lay["ep"], etp=lay["etp"])
    return out


def _write_manifest(tmp: Path, parts, config: LoraConfig, adapter_name: str, lay: dict, extra: dict) -> None:
    tensors, files = {}, {}
    for file, digests, described in parts:
        files.update({name: {"sha256": digest} for name, digest in digests.items()})
        for key, meta, part in described:
            entry = tensors.setdefault(key, {**meta, "files": {}})
            entry["files"][file] = part
    manifest = {"format": FORMAT, "adapter_name": adapter_name, "adapter_config": config.to_dict(),
                "layout": _layout(lay), "model_config": lay["model_config"],
                "files": dict(sorted(files.items())), "tensors": dict(sorted(tensors.items())), **extra}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: str | Path) -> dict:
    """The manifest of a checkpoint directory, validated (format, file names inside the directory)."""
    path = Path(path)
    recover(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; {path} is not a dist_lora adapter checkpoint")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name in manifest["files"]:
        resolved = (path / name).resolve()
        if Path(name).name != name or resolved.parent != path.resolve():
            raise ValueError(f"manifest entry {name!r} points outside {path}; refusing to read it")
    return manifest


class ShardReader:
    """Opens checkpoint files on first use, after checking their sha256 against the manifest."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest, self.handles = path, manifest, {}
        self.bytes_read = 0

    def handle(self, file: str):
        if file not in self.handles:
            full = self.path / file
            if not full.is_file():
                raise FileNotFoundError(f"checkpoint shard {full} is missing")
            if sha256_of(full) != self.manifest["files"][file]["sha256"]:
                raise ValueError(f"checksum mismatch for {full}: the checkpoint is corrupted")
            try:
                self.handles[file] = safe_open(str(full), framework="pt")
            except SafetensorError as err:
                raise ValueError(f"{full} is not a readable safetensors file: {err}") from err
        return self.handles[file]

    def read(self, file: str, key: str, dim: int | None = None, start: int = 0, length: int | None = None):
        if dim is None:
            tensor = self.handle(file).get_tensor(key)
        else:
            piece = self.handle(file).get_slice(key)
            index = [slice(None)] * len(piece.get_shape())
            index[dim] = slice(start, start + length)
            tensor = piece[tuple(index)]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def global_tensor(self, key: str) -> torch.Tensor:
        """The whole (unpadded) tensor ``key``, assembled from every shard that holds part of it."""
        meta = self.manifest["tensors"][key]
        if meta["dim"] is None:
            return self.read(next(iter(meta["files"])), key)
        tp = _saved_parts(self.manifest, meta)
        out = torch.zeros([_extent(meta, tp) if d == meta["dim"] else s for d, s in enumerate(meta["shape"])],
                          dtype=getattr(torch, meta["dtype"]), device="cpu")  # read into host memory
        for file, rank in meta["files"].items():
            for have in pieces(_extent(meta, tp), tp, rank, meta["stride"]):
                part = self.read(file, key, meta["dim"], have.local_start, have.length)
                out.narrow(meta["dim"], have.global_start, have.length).copy_(part)
        return out.narrow(meta["dim"], 0, meta["shape"][meta["dim"]]).contiguous()

    def local_shard(self, key: str, tp: int, rank: int, local_shape: tuple[int, ...]) -> torch.Tensor:
        """Rank ``rank`` of ``tp``'s shard of ``key`` (TP, or ETP for a routed expert's), reading
        only the overlapping saved slices."""
        meta = self.manifest["tensors"][key]
        if meta["dim"] is None:
            return self.read(next(iter(meta["files"])), key)
        dim, stride, saved_tp = meta["dim"], meta["stride"], _saved_parts(self.manifest, meta)
        out = torch.zeros(local_shape, dtype=getattr(torch, meta["dtype"]), device="cpu")  # host; copied to the model
        real = meta["shape"][dim]
        for need in pieces(_extent(meta, tp), tp, rank, stride):
            for file, saved_rank in meta["files"].items():
                for have in pieces(_extent(meta, saved_tp), saved_tp, saved_rank, stride):
                    hit = overlaps(need, have)
                    if hit is None:
                        continue
                    at_out, at_file, length = hit
                    length = min(length, max(0, real - (need.global_start + at_out - need.local_start)))
                    if length > 0:
                        out.narrow(dim, at_out, length).copy_(self.read(file, key, dim, at_file, length))
        return out


def load_adapter(model, path: str | Path, adapter_name: str = "default", hotswap: bool | str = AUTO) -> None:
    """Load a sharded adapter checkpoint onto ``model``'s layout (any TP / PP), collectively.

    The adapter is created from the checkpoint's config (LoRA or AdaLoRA, by its ``peft_type``)
    if the model does not have it yet. An existing adapter must be of the same method (and, for
    AdaLoRA, the same ``init_r``); it takes the checkpoint's learned config fields
    (``LoraConfig.LEARNED``: AdaLoRA's ``rank_pattern``). Every tensor of the adapter must be in
    the checkpoint with the same global shape; errors (missing or corrupted shard, checksum
    mismatch, a checkpoint of another model or method) are raised on every rank and leave the
    model's adapter weights and config unchanged.

    ``hotswap=True`` copies a LoRA checkpoint of any rank up to the loaded one's, with its own
    alpha / rsLoRA / patterns, into the existing adapter ``adapter_name`` in place (each rank
    reads only its slices); ``"auto"`` (default) does so when hotswap is enabled
    (:func:`~dist_lora.adapters.hotswap.enable_hotswap`) and the adapter exists.
    """
    model = unwrap_compiled(model)
    path = Path(path)
    manifest, config, current, swapping = None, None, existing(model).get(adapter_name), False
    with on_every_rank(f"loading adapter from {path}"):
        manifest = read_manifest(path)
        config = config_from_dict(manifest["adapter_config"])
        _check_same_model(model, manifest, path)
        swapping = resolve_hotswap(model, adapter_name, hotswap)
        if swapping:
            pass
        elif current is not None:
            current.check_loadable(config)
        else:
            check_fits(model, config, {".".join(k.split(".")[:-1]): m["shape"][0] for k, m in manifest["tensors"].items()
                                       if m["role"] == "lora_A"}, str(path))
    if swapping:
        swap_in(model, config, CheckpointTensors(manifest, ShardReader(path, manifest), str(path)), adapter_name)
        return
    if current is None:
        add_from_config(model, config, adapter_name)
    mine, reader, staged = entries(model, adapter_name), ShardReader(path, manifest), []
    with on_every_rank(f"loading adapter from {path}"):
        for e in mine:
            staged.append((e, _load_entry(e, manifest, reader)))
    with torch.no_grad():
        for e, tensor in staged:
            e.param.copy_(tensor)
    if current is not None:
        for name in current.LEARNED:
            setattr(current, name, copy.deepcopy(getattr(config, name)))
    used = set().union(*all_gather_object({e.key for e in mine}))
    unused = sorted(k for k, m in manifest["tensors"].items() if k not in used and not is_training_state(m["role"]))
    if unused:
        raise ValueError(f"the checkpoint has tensors this model's adapter does not have: {unused[:5]} "
                         f"(was it saved from another model or config?)")
    if current is None:
        prepare_loaded(model, adapter_name)


_MODEL_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size", "tied_embeddings", "qkv_bias")


def _check_same_model(model, manifest: dict, path: Path) -> None:
    """A checkpoint's source model must have this model's shapes (not just matching names)."""
    spec = view(model).spec
    if (spec is None) != (not manifest.get("model_config")):
        saved = "a plain torch model" if spec is not None else "a Megatron model"
        raise ValueError(f"{path} was saved from {saved}, whose module names differ from this model's; "
                         f"export it with `dist-lora convert` and load it with import_peft")
    if spec is None:
        return
    saved = spec_from_config(manifest["model_config"])
    differ = [f"{f}: {getattr(saved, f)!r} vs {getattr(spec, f)!r}" for f in _MODEL_FIELDS
              if getattr(saved, f) != getattr(spec, f)]
    experts = [None if s.experts is None else (s.experts.num_experts, s.experts.ffn_hidden_size) for s in (saved, spec)]
    if experts[0] != experts[1]:
        differ.append(f"routed experts (count, FFN): {experts[0]} vs {experts[1]}")
    if differ:
        raise ValueError(f"{path} was saved from another model (checkpoint vs this model: {'; '.join(differ)})")


def _load_entry(e: Entry, manifest: dict, reader: ShardReader) -> torch.Tensor:
    meta = manifest["tensors"].get(e.key)
    if meta is None:
        raise KeyError(f"the checkpoint lacks {e.key} (saved from another model or config?)")
    if tuple(meta["shape"]) != tuple(e.shape):
        raise ValueError(f"{e.key}: the checkpoint holds shape {tuple(meta['shape'])}, this model needs "
                         f"{tuple(e.shape)} (a checkpoint of another model?)")
    return reader.local_shard(e.key, e.tp, e.rank, tuple(e.param.shape))
