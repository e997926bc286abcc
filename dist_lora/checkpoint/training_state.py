"""Training checkpoints: the adapter plus optimizer state, step, data position and RNG states.

Optimizer state tensors shaped like their parameter (AdamW's ``exp_avg`` / ``exp_avg_sq``) are
stored and resharded exactly like the parameter (key ``<param key>.optim.<name>``); scalar
state (``step``) is stored replicated. An adapter method with training state of its own
(:func:`dist_lora.checkpoint.methods.training_state_module`; AdaLoRA's allocator EMAs) hands it over in the
same form, ``{param: {name: tensor}}``, stored as ``<param key>.<namespace>.<name>`` and given
back to the method's ``restore_state`` on load. Every rank also writes its RNG states (CPU
generator and Megatron's tracker) to ``rng-rank<R>.safetensors``; they are restored when the
job has the same layout, so a resumed run continues with bit-identical losses on CPU, and
skipped with a warning when the layout changed (the streams of a different layout cannot be the same anyway).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_lora.adapters.hotswap import refuse_padded
from dist_lora.adapters.registry import existing, require_adapter
from dist_lora.checkpoint.entries import entries
from dist_lora.checkpoint.methods import config_from_dict, training_state_module
from dist_lora.checkpoint.sharded import ShardReader, load_adapter, read_manifest, write_sharded
from dist_lora.integrations.megatron import get_cuda_rng_tracker
from dist_lora.layers.sharding import FactorLayout
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import group_rank, group_size


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    states.update({f"tracker.{name}": state for name, state in get_cuda_rng_tracker().get_states().items()})
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tracked = {k[len("tracker."):]: v for k, v in states.items() if k.startswith("tracker.")}
    if tracked:
        get_cuda_rng_tracker().set_states(tracked)


def _state_entries(model, adapter_name: str, states, namespace: str):
    """Entries ``<param key>.<namespace>.<name>`` of ``states`` ({param: {name: tensor}}, like
    ``optimizer.state``): sharded like the parameter when shaped like it, else replicated."""
    out = []
    for e in entries(model, adapter_name):
        for name, value in states.get(e.param, {}).items():
            key, role = f"{e.key}.{namespace}.{name}", f"{namespace}.{name}"
            if not torch.is_tensor(value):
                raise TypeError(f"{namespace} state {name!r} of {e.key} is not a tensor; cannot checkpoint it")
            if value.shape == e.param.shape:
                out.append(replace(e, key=key, param=value, role=role))
            else:
                out.append(replace(e, key=key, param=value.reshape(()) if value.numel() == 1 else value,
                                   layout=FactorLayout(), shape=tuple(value.shape), role=role))
    return out


def _read_states(model, adapter_name: str, manifest: dict, reader: ShardReader, namespace: str) -> dict:
    """{param: {name: tensor}} of this rank's shards of the ``<param key>.<namespace>.*`` entries."""
    out = {}
    for e in entries(model, adapter_name):
        prefix = f"{e.key}.{namespace}."
        for key, meta in manifest["tensors"].items():
            if not key.startswith(prefix):
                continue
            local = tuple(e.param.shape) if meta["dim"] is not None else tuple(meta["shape"])
            tensor = reader.local_shard(key, e.tp, e.rank, local)
            out.setdefault(e.param, {})[key[len(prefix):]] = tensor.to(e.param.dtype) if tensor.dim() else tensor
    return out


def save_training_state(model, optimizer: torch.optim.Optimizer, path: str | Path, step: int,
                        data_position=None, adapter_name: str = "default", overwrite: bool = False,
                        extra: dict | None = None) -> None:
    """Collective: the adapter, ``optimizer``'s state of its parameters, ``step``,
    ``data_position`` and ``extra`` (JSON-serialisable, e.g. a scheduler's ``state_dict``), and
    every rank's RNG states, written atomically to ``path``."""
    with on_every_rank(f"saving training state to {path}"):
        refuse_padded(model, adapter_name, "training checkpoints")
    mine = entries(model, adapter_name) + _state_entries(model, adapter_name, optimizer.state, "optim")
    method = training_state_module(require_adapter(model, adapter_name))
    if method is not None:
        mine += _state_entries(model, adapter_name, method.state_tensors(model, adapter_name), method.NAMESPACE)
    rank = group_rank()
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    training = {"step": step, "data_position": data_position, "world_size": group_size(),
                "optimizer": type(optimizer).__name__, "param_groups": hyper, "extra": extra or {}}
    write_sharded(model, path, adapter_name, mine, overwrite,
                  rank_files={f"rng-rank{rank:05d}.safetensors": _rng_states()}, extra={"training": training})


def load_training_state(model, optimizer: torch.optim.Optimizer, path: str | Path,
                        adapter_name: str = "default") -> dict:
    """Collective: restore what ``save_training_state`` wrote onto this layout; returns the
    ``training`` record (``step``, ``data_position``, ``extra``, ...).

    The adapter, the optimizer's state and the adapter method's own state (AdaLoRA: the
    allocator's EMAs, its learned ``rank_pattern``) come back on any TP / PP layout. A checkpoint
    without training state, of another optimizer, method or (AdaLoRA) schedule fails on every
    rank before the model is changed.
    """
    path = Path(path)
    training, manifest = None, None
    with on_every_rank(f"loading training state from {path}"):
        manifest = read_manifest(path)
        training = manifest.get("training")
        if training is None:
            raise ValueError(f"{path} holds an adapter but no training state (saved with save_adapter?)")
        if training["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"{path} holds {training['optimizer']} state, not {type(optimizer).__name__}")
        config = existing(model).get(adapter_name)  # None: load_adapter creates it
        method = None if config is None else training_state_module(config)
        if method is not None:
            method.check_resumable(config, config_from_dict(manifest["adapter_config"]))
        if config is not None:
            refuse_padded(model, adapter_name, "training checkpoints")
    load_adapter(model, path, adapter_name, hotswap=False)
    method = training_state_module(require_adapter(model, adapter_name))
    staged, own = {}, {}
    with on_every_rank(f"loading training state from {path}"):
        reader = ShardReader(path, manifest)
        staged = _read_states(model, adapter_name, manifest, reader, "optim")
        if method is not None:
            own = _read_states(model, adapter_name, manifest, reader, method.NAMESPACE)
    if method is not None:
        method.restore_state(model, adapter_name, own)
    for param, states in staged.items():
        optimizer.state[param].update(states)
    rng_file = path / f"rng-rank{group_rank():05d}.safetensors"
    same_layout = training["world_size"] == group_size() and rng_file.is_file()
    if same_layout:
        reader = ShardReader(path, manifest)
        reader.handle(rng_file.name)  # checks its sha256
        _set_rng_states(load_file(rng_file))
    else:
        warnings.warn("the job's layout differs from the saved one; RNG states were not restored", stacklevel=2)
    return training
