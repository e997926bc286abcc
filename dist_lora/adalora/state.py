"""AdaLoRA's training state beyond parameters and optimizer: the allocator's EMAs, for training
checkpoints (:mod:`dist_lora.checkpoint.training_state` reaches this module through
:func:`dist_lora.methods.training_state_module`).

The allocator (:mod:`dist_lora.adalora.allocator`) keeps, per adapted module and role, the
sensitivity ``S`` and uncertainty ``U`` EMAs of this rank's shard, shaped exactly like the
parameter: ``lora_A`` Q [init_r, in_local] (split on ``in`` on row layers), ``lora_E`` Lambda
[init_r, 1] (replicated), ``lora_B`` P [out_local, init_r] (split on ``out`` on column layers).
They are saved as ``<param key>.adalora.sensitivity`` / ``.adalora.uncertainty`` with the
parameter's layout, so they are stored once per TP shard by data-parallel replica 0 and
resharded to any TP / PP layout on load, like the optimizer's ``exp_avg``. The budgets are not
saved: they follow from the model and the config. The learned ``rank_pattern`` travels in the
adapter config of the manifest (:meth:`dist_lora.config.LoraConfig.check_loadable`, ``LEARNED``).

No EMAs exist before the first ``update_and_allocate`` nor after the final pattern is fixed
(the allocator drops them at ``total_step - tfinal``); then nothing is saved and a restore
leaves the allocator empty, as the uninterrupted run has it.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.adalora.allocator import _ROLES, allocator_state, existing_state
from dist_lora.adalora.layers import adalora_config, svd_factors
from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.config.lora import LoraConfig
from dist_lora.parallel.agreement import raise_if_any

NAMESPACE = "adalora"
_NAMES = ("sensitivity", "uncertainty")
# The allocator's schedule: a resumed run must use the checkpoint's, or its EMAs and pattern mean
# something else (init_r is checked by AdaLoraConfig.check_loadable, as for any load).
_SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "total_step")


def state_tensors(model: nn.Module, adapter_name: str) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
    """``{parameter: {"sensitivity": S, "uncertainty": U}}`` for this rank's AdaLoRA parameters
    (local shards, the live tensors, no copies); empty when the allocator holds no EMAs. No
    collective."""
    state = existing_state(model, adapter_name)
    if state is None or not state.sensitivity:
        return {}
    out = {}
    for name, _, f in svd_factors(model, adapter_name):
        for role in _ROLES:
            key = (name, role)
            out[getattr(f, role)] = {"sensitivity": state.sensitivity[key], "uncertainty": state.uncertainty[key]}
    return out


def check_resumable(config: LoraConfig, saved: LoraConfig) -> None:
    """Raise ``ValueError`` if a run with adapter config ``config`` cannot resume the allocator
    of a checkpoint saved with ``saved`` (another schedule). Another method is reported by
    :meth:`~dist_lora.config.LoraConfig.check_loadable`."""
    if not isinstance(saved, AdaLoraConfig) or not isinstance(config, AdaLoraConfig):
        return
    differ = [f"{f}: {getattr(saved, f)!r} vs {getattr(config, f)!r}" for f in _SCHEDULE
              if getattr(saved, f) != getattr(config, f)]
    if differ:
        raise ValueError(f"the checkpoint's AdaLoRA schedule differs from this adapter's (checkpoint vs this "
                         f"model: {'; '.join(differ)}); resume with the checkpoint's AdaLoRA settings")


def restore_state(model: nn.Module, adapter_name: str, tensors: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """Set the allocator's EMAs of ``adapter_name`` to ``tensors`` (as :func:`state_tensors`
    returns them, read from a checkpoint onto this rank's shards), or empty them when
    ``tensors`` is empty.

    Collective over the whole job (validation), then over PP (the allocator's budgets). A
    checkpoint that holds EMAs for some of this rank's parameters but not all fails on every
    rank and leaves the allocator as it was.
    """
    config = adalora_config(model, adapter_name)
    params = [(name, role, getattr(f, role)) for name, _, f in svd_factors(model, adapter_name) for role in _ROLES]
    error = None
    if tensors:
        incomplete = [f"{name}.{role}" for name, role, p in params if sorted(tensors.get(p, {})) != sorted(_NAMES)]
        if incomplete:
            error = ValueError(f"the checkpoint's AdaLoRA allocator state is incomplete: {incomplete[0]} lacks "
                               f"{' or '.join(_NAMES)} (a damaged or hand-edited checkpoint?)")
    raise_if_any(error, what="restoring the AdaLoRA allocator")
    state = allocator_state(model, adapter_name, config)
    state.reset()
    if not tensors:
        return
    for name, role, p in params:
        saved = tensors[p]
        state.sensitivity[(name, role)] = saved["sensitivity"].to(p.dtype).contiguous()
        state.uncertainty[(name, role)] = saved["uncertainty"].to(p.dtype).contiguous()
