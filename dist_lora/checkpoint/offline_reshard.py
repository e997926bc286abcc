"""Re-lay a sharded adapter checkpoint for another TP / PP layout, in one process, offline.

Keys are layout-independent, so a key's pipeline stage follows from its global layer index
(``decoder.layers.<g>.``, placed by the model's stage map ``ModelSpec.layers_of_stage``: even,
balanced or with the given first / last stage layer counts), the word embedding (first stage)
or the output layer (last stage), and its TP shards from the manifest's split dim and stride.
Each new shard is read with ``ShardReader.local_shard`` (only the overlapping saved slices) and
the result appears atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from dist_lora.checkpoint.atomic import atomic_directory
from dist_lora.checkpoint.reshard import padded_extent
from dist_lora.checkpoint.sharded import MANIFEST, ShardReader, read_manifest, sha256_of
from dist_lora.models.spec import ModelSpec, spec_from_config

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def stage_of(key: str, spec: ModelSpec, pp: int) -> int:
    """The pipeline stage (of ``pp``) that holds the tensor ``key`` of a model of ``spec``."""
    match = _LAYER.match(key)
    if match:
        return spec.stage_of_layer(int(match.group(1)), pp)
    if key.startswith("embedding."):
        return 0
    if key.startswith("output_layer."):
        return pp - 1
    raise ValueError(f"cannot place {key!r} on a pipeline stage")


def reshard_checkpoint(src: str | Path, dst: str | Path, tp: int, pp: int, overwrite: bool = False,
                       first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> Path:
    """Write ``src`` re-laid for ``tp`` x ``pp`` to ``dst``; returns ``dst``.

    ``first_stage_layers`` / ``last_stage_layers``: the new layout's stage map, as given to
    ``models.from_pretrained`` by the job that will load it (default: even, or balanced)."""
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    model_config = manifest.get("model_config")
    if model_config is None and (tp, pp, first_stage_layers, last_stage_layers) != (1, 1, None, None):
        raise ValueError(f"{src} was saved from a plain (unsharded) model; it has no TP / PP layout to change")
    spec = None
    if model_config is not None:
        spec = spec_from_config(model_config).with_pipeline(first_stage_layers, last_stage_layers)
        spec.check_layout(tp, pp)
    reader = ShardReader(src, manifest)
    tensors, files = {}, {}
    with atomic_directory(dst, overwrite) as tmp:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                file = f"adapter-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"
                shard = {}
                for key, meta in manifest["tensors"].items():
                    if spec is not None and stage_of(key, spec, pp) != pp_rank:
                        continue
                    if meta["dim"] is None:
                        if tp_rank == 0:
                            shard[key] = reader.read(next(iter(meta["files"])), key)
                    else:
                        extent = padded_extent(meta["shape"][meta["dim"]], tp, meta["stride"], meta["size"] is not None)
                        local = list(meta["shape"])
                        local[meta["dim"]] = extent // tp
                        shard[key] = reader.local_shard(key, tp, tp_rank, tuple(local))
                    if key in shard:
                        tensors.setdefault(key, {k: v for k, v in meta.items() if k != "files"})
                        tensors[key].setdefault("files", {})[file] = tp_rank
                if shard:
                    save_file(shard, str(tmp / file), metadata={"format": "pt"})
                    files[file] = {"sha256": sha256_of(tmp / file)}
        # RNG states belong to the saved layout; a re-laid checkpoint does not carry them.
        layout = {"tp": tp, "pp": pp}
        if spec is not None and pp > 1:
            layout["stage_layers"] = list(spec.stage_sizes(pp))
        out = {**manifest, "layout": layout, "files": dict(sorted(files.items())),
               "tensors": dict(sorted(tensors.items()))}
        if "training" in out:
            out["training"] = {**out["training"], "world_size": None}
        (tmp / MANIFEST).write_text(json.dumps(out, indent=1))
    return dst
