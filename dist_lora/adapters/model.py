"""The model seam: everything adapter, checkpoint and method code needs to know about a model.

dist_lora adapts two kinds of model:

* a **Megatron model** built by :func:`dist_lora.models.from_pretrained`: sharded over TP / PP /
  DP, with its :class:`~dist_lora.models.loading.ModelInfo` (spec, groups) in ``model.dist_lora``;
  its candidates carry Hugging Face *and* Megatron names with global layer indices;
* a **plain model** (any ``torch.nn`` model, e.g. a Hugging Face model on one device or under
  DeepSpeed): every layer unsharded (TP = PP = 1), candidates named by its own module names, no
  data-parallel group of its own (DeepSpeed reduces its gradients).

:func:`view` is the one place that tells them apart; code elsewhere asks the view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dist_lora.adapters.candidates import Candidate, megatron_candidates, plain_candidates
from dist_lora.models.loading import ModelInfo, info_of
from dist_lora.models.spec import ModelSpec
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class ModelView:
    """A model and, for a Megatron model, its :class:`ModelInfo` (``None`` for a plain model)."""

    model: nn.Module
    info: ModelInfo | None = None

    @property
    def megatron(self) -> bool:
        return self.info is not None

    @property
    def spec(self) -> ModelSpec | None:
        """The model's architecture (Megatron models; ``None`` for plain ones)."""
        return self.info.spec if self.info is not None else None

    @property
    def groups(self) -> ParallelGroups | None:
        return self.info.groups if self.info is not None else None

    @property
    def vocab_size(self) -> int | None:
        """The real (unpadded) vocabulary of a Megatron model; a plain embedding knows its own."""
        return self.info.spec.vocab_size if self.info is not None else None

    def seed(self, seed: int | None) -> int:
        """``seed``, or the seed given to ``parallel.initialize`` (0 for plain models)."""
        if seed is not None:
            return seed
        return self.info.groups.seed if self.info is not None else 0

    @property
    def pp_group(self) -> Any:
        """The pipeline group when PP > 1, else ``None`` (nothing to exchange between stages)."""
        g = self.groups
        return g.pp_group if g is not None and g.pp_size > 1 else None

    @property
    def dp_group(self) -> Any:
        """The data-parallel group dist_lora reduces over when DP > 1, else ``None``."""
        g = self.groups
        return g.dp_group if g is not None and g.dp_size > 1 else None

    def candidates(self) -> list[Candidate]:
        """Every adaptable output on this rank (this pipeline stage's layers)."""
        if self.info is not None:
            return megatron_candidates(self.model, self.info)
        return plain_candidates(self.model)

    def gather_stages(self, part: dict) -> dict:
        """Collective over the pipeline group: the union of every stage's ``part``."""
        if self.pp_group is None:
            return dict(part)
        merged: dict = {}
        for other in all_gather_object(part, self.pp_group):
            merged.update(other)
        return merged

    def layout(self) -> dict:
        """This rank's place in the layout, the model config and the layers of every pipeline
        stage, as checkpoints record them."""
        if self.info is None:
            return {"tp": 1, "pp": 1, "tp_rank": 0, "pp_rank": 0, "dp_rank": 0, "model_config": None,
                    "stage_layers": None}
        g = self.info.groups
        return {"tp": g.tp_size, "pp": g.pp_size, "tp_rank": g.tp_rank, "pp_rank": g.pp_rank,
                "dp_rank": g.dp_rank, "model_config": self.info.spec.hf_config,
                "stage_layers": list(self.info.spec.stage_sizes(g.pp_size))}


def view(model: nn.Module) -> ModelView:
    """The seam's view of ``model`` (see module docstring)."""
    return ModelView(model, info_of(model))
