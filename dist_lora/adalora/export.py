"""Release an AdaLoRA adapter in PEFT's formats: AdaLoRA itself, or plain LoRA.

``format="adalora"`` writes what ``peft``'s ``save_pretrained`` writes for an ``AdaLoraModel``:
keys ``base_model.model.<module>.lora_A`` / ``lora_E`` / ``lora_B`` holding only the kept
triplets of ``rank_pattern`` (PEFT's ``resize_state_dict_by_rank_pattern``), and the config with
``rank_pattern`` (lists of kept flags); ``peft.PeftModel.from_pretrained`` shrinks its modules to
that pattern and gives the same logits (``ranknum`` stays ``init_r``).

``format="lora"`` folds Lambda and the scaling into A: ``A' = scaling * Lambda * Q``,
``B' = P`` over the kept triplets, so ``delta W = B' A'`` exactly; each module gets its integer
rank in ``rank_pattern`` and ``alpha_pattern`` equal to it (LoRA scaling 1). Modules with no
triplet left are not exported (they add nothing). Loads as a ``peft.LoraConfig`` adapter.

Collective (gathers the adapter like :func:`dist_lora.adapter_state_dict`); global rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dist_lora.adalora.layers import adalora_config
from dist_lora.checkpoint.peft_format import CONFIG, WEIGHTS, adapter_files
from dist_lora.checkpoint.peft_names import PREFIX
from dist_lora.checkpoint.state_dict import adapter_state_dict
from dist_lora.config.lora import LoraConfig
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.collectives import group_rank

FORMATS = ("adalora", "lora")


def _modules(state: dict) -> list[str]:
    return sorted(k[len(PREFIX):-len(".lora_E")] for k in state if k.endswith(".lora_E"))


def _kept(config, module: str, lambdas: torch.Tensor) -> torch.Tensor:
    """Indices of the kept triplets of ``module`` among its current ones (``lambdas`` [rank, 1]),
    on their device."""
    rank = lambdas.shape[0]
    pattern = (config.rank_pattern or {}).get(f"{module}.lora_E")
    if pattern is None or len(pattern) != rank:  # no pattern yet, or already shrunk to it
        return torch.arange(rank, device=lambdas.device)
    return torch.tensor(pattern, dtype=torch.bool, device=lambdas.device).nonzero().view(-1)


def _adalora_files(config, state: dict) -> tuple[dict, dict]:
    out = {}
    for module in _modules(state):
        base = f"{PREFIX}{module}."
        keep = _kept(config, module, state[base + "lora_E"])
        out[base + "lora_A"] = state[base + "lora_A"][keep]
        out[base + "lora_E"] = state[base + "lora_E"][keep]
        out[base + "lora_B"] = state[base + "lora_B"][:, keep]
    meta = config.to_dict()
    meta.update(peft_type="ADALORA", init_lora_weights=True)
    return out, meta


def _lora_files(config, state: dict) -> tuple[dict, dict]:
    out, ranks = {}, {}
    scaling = config.scaling_for(config.init_r, config.lora_alpha)
    for module in _modules(state):
        base = f"{PREFIX}{module}."
        keep = _kept(config, module, state[base + "lora_E"])
        if keep.numel() == 0:
            continue
        q, e, p = state[base + "lora_A"][keep], state[base + "lora_E"][keep], state[base + "lora_B"][:, keep]
        out[f"{base}lora_A.weight"] = (scaling * e * q).contiguous()
        out[f"{base}lora_B.weight"] = p.contiguous()
        ranks[module] = int(keep.numel())
    if not ranks:
        raise ValueError("every triplet of the adapter is pruned: there is no LoRA adapter to export")
    lora = LoraConfig(r=config.init_r, lora_alpha=config.init_r, lora_dropout=config.lora_dropout,
                      target_modules=sorted(ranks), rank_pattern=dict(ranks), alpha_pattern=dict(ranks),
                      task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path)
    return out, lora.to_dict()


def export_adalora(model: nn.Module, out_dir: str | Path, adapter_name: str = "default", format: str = "adalora",
                   base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the AdaLoRA adapter as a PEFT ``format`` ("adalora" or "lora") adapter directory."""
    config = None
    with on_every_rank(f"exporting AdaLoRA adapter {adapter_name!r}"):
        config = adalora_config(model, adapter_name)
        if format not in FORMATS:
            raise ValueError(f"format={format!r}; choose one of {FORMATS}")
    state = adapter_state_dict(model, adapter_name)
    target = Path(out_dir)
    with on_every_rank(f"exporting to {target}"):
        if group_rank() == 0:
            tensors, meta = (_adalora_files if format == "adalora" else _lora_files)(config, state)
            if base_model_name_or_path is not None:
                meta["base_model_name_or_path"] = base_model_name_or_path
            with adapter_files(target, overwrite) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
                (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return target
