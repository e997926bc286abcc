"""``from_pretrained``: a Hugging Face checkpoint streamed into this rank's Megatron shard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dist_lora.models.build import DISPATCHERS, build_gpt, check_stage_layers
from dist_lora.models.hf_checkpoint import HFCheckpoint
from dist_lora.models.layouts import ExpertSlice, read_local
from dist_lora.models.mapping import bind, check_coverage
from dist_lora.models.spec import ModelSpec, read_spec
from dist_lora.parallel import ParallelGroups, current_groups
from dist_lora.parallel.agreement import on_every_rank
from dist_lora.parallel.device import check_dtype


@dataclass(frozen=True)
class ModelInfo:
    """What dist_lora keeps about a loaded model (``model.dist_lora``)."""

    spec: ModelSpec
    groups: ParallelGroups
    dtype: torch.dtype
    source: str
    bytes_read: int = 0
    ddp: object = None  # Megatron-Core DistributedDataParallel reducing DP gradients (use_megatron_ddp)


def info_of(model: torch.nn.Module) -> ModelInfo | None:
    """The model's :class:`ModelInfo`, or ``None`` for a model ``from_pretrained`` did not build
    (adapter code asks :func:`dist_lora.adapters.model.view` instead)."""
    info = getattr(model, "dist_lora", None)
    return info if isinstance(info, ModelInfo) else None


def model_info(model: torch.nn.Module) -> ModelInfo:
    info = info_of(model)
    if info is None:
        raise TypeError("this model was not built by dist_lora.models.from_pretrained")
    return info


def _source(item, ckpt: HFCheckpoint, available: set[str]):
    """(HF names, layout, reader) of a bound entry in this checkpoint's format: the original
    per-expert tensors, or transformers' fused ones (a routed expert reads its slice of them)."""
    if item.entry.fused is None or all(n in available for n in item.hf_names):
        return item.hf_names, item.layout, ckpt
    names, layout = item.fused_source()
    if not all(n in available for n in names):
        return item.hf_names, item.layout, ckpt  # neither format: the read names the missing tensor
    return names, layout, ckpt if item.expert is None else ExpertSlice(ckpt, item.expert)


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32,
                    groups: ParallelGroups | None = None, first_stage_layers: int | None = None,
                    last_stage_layers: int | None = None, moe_token_dispatcher: str = "alltoall") -> torch.nn.Module:
    """Build this rank's Megatron-Core ``GPTModel`` shard from an HF model directory.

    Each rank reads only the slices of the safetensors files that its TP rank and PP stage own
    (``model.dist_lora.bytes_read`` says how many bytes; of a mixture-of-experts layer's fused
    expert tensors, only its experts' (EP) shards (ETP)) into a model on the local device
    (``cuda:LOCAL_RANK`` with CUDA, else the CPU). ``dtype`` is the base's: float32, bfloat16 or
    float16 (adapters added later train in float32 on a half-precision base unless asked
    otherwise). Any bad input (a dtype the device cannot compute in, missing or truncated
    file, unsupported architecture, a TP size that does not divide the heads, KV heads or FFN
    size, a pipeline layout that cannot hold the model, an EP size that does not divide the
    experts or an ETP size that does not divide the expert FFN) raises the same error on every
    rank before any weight is read.
    ``moe_token_dispatcher``: ``alltoall`` or ``allgather`` (Megatron-Core's token dispatchers).

    Pipeline stages: when PP divides the layers every stage holds the same number; otherwise the
    stages are balanced automatically (:mod:`dist_lora.models.pipeline_layout`), or
    ``first_stage_layers`` / ``last_stage_layers`` give the first / last stage that many layers
    and the other stages split the rest evenly (Megatron-Core's
    ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``).
    """
    groups = groups or current_groups()
    spec = ckpt = None
    with on_every_rank(f"loading {path}"):
        check_dtype(dtype)
        spec = read_spec(path).with_pipeline(first_stage_layers, last_stage_layers)
        spec.check_layout(groups.tp_size, groups.pp_size)
        if moe_token_dispatcher not in DISPATCHERS:
            raise ValueError(f"moe_token_dispatcher={moe_token_dispatcher!r}: use one of {', '.join(DISPATCHERS)}")
        if spec.experts is not None:
            spec.experts.check_layout(groups.ep_size, groups.etp_size, groups.tp_size, groups.sequence_parallel)
        elif groups.ep_size * groups.etp_size > 1:
            raise ValueError(f"expert_parallel={groups.ep_size} / expert_tensor_parallel={groups.etp_size} need a "
                             f"mixture-of-experts model; {path} is a dense {spec.family.name} model")
        ckpt = HFCheckpoint(path)

    model = build_gpt(spec, groups, dtype, moe_token_dispatcher)
    params = dict(model.named_parameters())
    with on_every_rank(f"loading {path}"):
        check_stage_layers(model, spec, groups)
        bound = bind(spec, params, groups.pp_rank, groups.pp_size, groups.ep_rank, groups.ep_size)
        check_coverage(bound, params)
        available = set(ckpt.names())
        with torch.no_grad():
            for item in bound:
                names, layout, reader = _source(item, ckpt, available)
                parts, part = (groups.tp_size, groups.tp_rank) if item.expert is None else (groups.etp_size,
                                                                                           groups.etp_rank)
                shard = read_local(layout, reader, names, spec, parts, part)
                target = params[item.local_name]
                if tuple(shard.shape) != tuple(target.shape):
                    shapes = {n: ckpt.shape(n) for n in names}
                    raise ValueError(
                        f"checkpoint tensors {shapes} do not fit {item.local_name} of shape "
                        f"{tuple(target.shape)} on TP rank {groups.tp_rank}: the weights do not "
                        f"match config.json"
                    )
                target.copy_(shard)
    model.dist_lora = ModelInfo(spec, groups, dtype, str(path), ckpt.bytes_read)
    ckpt.close()
    return model
