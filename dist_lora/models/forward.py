"""``logits``: full-vocabulary logits on every rank, for any TP / SP / PP layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.integrations.megatron import get_forward_backward_func
from dist_lora.integrations.megatron_cpu import cpu_device_mode
from dist_lora.models.loading import model_info
from dist_lora.parallel.collectives import broadcast_, gather_last_dim
from dist_lora.parallel.device import module_device


def _stage_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, pp_size: int):
    """This stage's output: vocab-sharded logits [b, s, V'/p] on the last stage, else None."""
    if pp_size == 1:
        return model(input_ids, position_ids, attention_mask=None)

    def forward_step(_data_iterator, chunk):
        out = chunk(input_ids, position_ids, attention_mask=None)
        return out, lambda output, non_loss_data=False: output

    with cpu_device_mode():
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=input_ids.shape[1],
            micro_batch_size=input_ids.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return store[0] if store else None


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[batch, seq, vocab]`` of ``input_ids`` ``[batch, seq]``, on every rank, on the
    model's device (``input_ids`` are moved there).

    Vocabulary shards are all-gathered over TP and the padding rows of the vocabulary are cut
    off; with PP the pipeline schedule runs one micro-batch and the last stage broadcasts the
    result over the PP group. Under sequence parallelism a sequence that does not divide by the
    TP size is padded at the end (causal attention keeps the padding invisible) and cut back.
    """
    info = model_info(model)
    groups, spec = info.groups, info.spec
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= spec.vocab_size):
        raise ValueError(f"input_ids must lie in [0, {spec.vocab_size}); got {int(input_ids.min())}..{int(input_ids.max())}")
    batch, seq = input_ids.shape
    device = module_device(model)
    pad = (-seq) % groups.tp_size if groups.sequence_parallel else 0
    ids = F.pad(input_ids.to(device), (0, pad))
    positions = torch.arange(seq + pad, device=device).unsqueeze(0).expand(batch, -1)
    was_training = model.training
    model.eval()
    try:
        local = _stage_forward(model, ids, positions, groups.pp_size)
    finally:
        model.train(was_training)
    if groups.is_last_stage:
        full = gather_last_dim(local, groups.tp_group)[:, :seq, : spec.vocab_size].float().contiguous()
    else:
        full = torch.empty(batch, seq, spec.vocab_size, dtype=torch.float32, device=device)
    if groups.pp_size > 1:
        broadcast_(full, groups.pp_size - 1, groups.pp_group)
    return full
