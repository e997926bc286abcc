"""``ParallelGroups``: the process groups of one layout, resolved once and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParallelGroups:
    """Ranks and process groups of one tensor x pipeline x data parallel layout.

    Global ranks are laid out as Megatron-Core does (order ``tp-cp-ep-dp-pp``): tensor-parallel
    ranks are adjacent, pipeline stages are furthest apart. ``None`` groups mean "the default
    group" only when the corresponding size is 1 and no communication is needed.

    Mixture-of-experts layers have a grid of their own within each pipeline stage (Megatron's
    ``expert_model_parallel_size`` / ``expert_tensor_parallel_size``): the stage's
    ``world / pp`` ranks are ``etp x ep x edp`` with expert-tensor-parallel ranks adjacent. An
    expert lives on one expert-parallel (EP) rank, split over its ETP group; the ranks of its
    expert-data-parallel (EDP) group hold replicas of it. EP is carved out of the dense layers'
    TP x DP ranks, so the EDP group is *not* the dense DP group (``edp = tp * dp / (etp * ep)``).
    """

    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    sequence_parallel: bool
    backend: str
    launcher: str
    seed: int
    local_rank: int = 0  # this process's index on its node (the launcher's LOCAL_RANK / SLURM_LOCALID / ...)
    tp_group: Any = field(repr=False, compare=False, default=None)
    pp_group: Any = field(repr=False, compare=False, default=None)
    dp_group: Any = field(repr=False, compare=False, default=None)
    model_parallel_group: Any = field(repr=False, compare=False, default=None)
    embedding_group: Any = field(repr=False, compare=False, default=None)
    ep_size: int = 1
    etp_size: int = 1
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
    ep_group: Any = field(repr=False, compare=False, default=None)  # the experts of one layer, spread out
    etp_group: Any = field(repr=False, compare=False, default=None)  # the shards of one expert
    edp_group: Any = field(repr=False, compare=False, default=None)  # the replicas of one expert shard
    expert_model_parallel_group: Any = field(repr=False, compare=False, default=None)  # etp x ep x pp

    @property
    def edp_size(self) -> int:
        """Replicas of each expert shard: ``tp * dp / (etp * ep)``."""
        return self.tp_size * self.dp_size // (self.etp_size * self.ep_size)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def layout(self) -> str:
        """Short name of the layout, e.g. ``tp2-pp1-dp2-sp``."""
        sp = "-sp" if self.sequence_parallel else ""
        experts = f"-ep{self.ep_size}-etp{self.etp_size}" if self.ep_size * self.etp_size > 1 else ""
        return f"tp{self.tp_size}-pp{self.pp_size}-dp{self.dp_size}{experts}{sp}"
