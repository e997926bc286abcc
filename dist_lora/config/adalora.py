"""``AdaLoraConfig``: PEFT's AdaLoRA configuration, field for field (https://openreview.net/forum?id=lq62uWRJjiY).

AdaLoRA trains ``init_r`` singular triplets (P, Lambda, Q) per adapted weight and prunes the
least important ones until, after ``total_step - tfinal`` steps, ``target_r`` triplets per weight
remain *on average over all adapted weights* (one global budget). Schedule: no pruning for the
first ``tinit`` steps, a cubic budget decrease until ``total_step - tfinal``, then the rank
pattern is fixed. ``rank_pattern`` holds the learned pattern (PEFT module name ->
list of kept flags) once the allocator has masked at least once.

The LoRA fields that apply are inherited from :class:`dist_lora.LoraConfig` (``lora_alpha``,
``lora_dropout``, ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``layers_pattern``, ``init_lora_weights``); ``r`` is ignored as in PEFT (``init_r`` is the
starting rank), and DoRA, ``lora_bias``, ``alpha_pattern``, trainable biases and
``modules_to_save`` are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from dist_lora.config.lora import LoraConfig


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's ``AdaLoraConfig`` (see the module docstring).

    Attributes:
        target_r: average rank per adapted weight at the end of the budget schedule.
        init_r: rank each adapted weight starts with (>= target_r).
        tinit: steps before pruning starts; tfinal: steps of fine-tuning with a fixed pattern.
        deltaT: prune every ``deltaT`` steps during the schedule.
        beta1, beta2: EMA factors of sensitivity and uncertainty (both in (0, 1)).
        orth_reg_weight: weight of the orthogonality penalty on P and Q (>= 0).
        total_step: training steps; must exceed ``tinit + tfinal``.
        rank_pattern: learned pattern, ``{"model.layers.0.self_attn.q_proj.lora_E": [True, ...]}``.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None
    peft_type: str = "ADALORA"

    LEARNED: ClassVar[tuple[str, ...]] = ("rank_pattern",)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is wrong (PEFT's checks, and those
        PEFT leaves to fail later: ``target_r > init_r``, betas outside (0, 1))."""
        if self.peft_type != "ADALORA":
            raise ValueError(f"peft_type={self.peft_type!r}: AdaLoraConfig describes ADALORA adapters only")
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA (as in PEFT); set use_dora=False")
        if self.lora_bias:
            raise ValueError("AdaLoRA does not support lora_bias; set lora_bias=False")
        if self.alpha_pattern:
            raise ValueError("AdaLoRA does not use alpha_pattern; leave it empty")
        if self.modules_to_save:
            raise ValueError("modules_to_save is not supported with AdaLoRA in dist_lora; leave it None")
        if self.use_rslora:
            raise ValueError("AdaLoRA scales by lora_alpha / init_r; use_rslora does not apply")
        if self.init_lora_weights not in (True, False):
            raise ValueError(f"init_lora_weights must be True or False for AdaLoRA, got {self.init_lora_weights!r}")
        _positive_int("init_r", self.init_r)
        _positive_int("target_r", self.target_r)
        _positive_int("tinit", self.tinit, allow_zero=True)
        _positive_int("tfinal", self.tfinal, allow_zero=True)
        _positive_int("deltaT", self.deltaT)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only prunes; "
                             f"set target_r <= init_r")
        if self.total_step is None:
            raise ValueError("AdaLoRA needs total_step (the number of training steps); set total_step")
        _positive_int("total_step", self.total_step)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"total_step={self.total_step} must be larger than tinit + tfinal = "
                             f"{self.tinit + self.tfinal}: the schedule has no budgeting phase; decrease "
                             f"tinit / tfinal or increase total_step")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be None or a dict, got {type(self.rank_pattern).__name__}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported with AdaLoRA in dist_lora; set bias='none'")
        self.check_shared_fields()

    def scaling_for(self, r: int, alpha: float) -> float:
        """PEFT's AdaLoRA scaling: ``lora_alpha / (ranknum + 1e-5)`` with ranknum = init_r (fixed)."""
        return (alpha if alpha > 0 else float(r)) / (float(r) + 1e-5)

    def check_loadable(self, saved: "LoraConfig") -> None:
        """Also refuse another ``init_r`` (the triplet count every saved tensor is shaped by)."""
        super().check_loadable(saved)
        if saved.init_r != self.init_r:
            raise ValueError(f"the checkpoint's AdaLoRA adapter has init_r={saved.init_r} but this model's has "
                             f"init_r={self.init_r}; apply AdaLoRA with init_r={saved.init_r} to load it")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rank_pattern"] = None if self.rank_pattern is None else dict(self.rank_pattern)
        return out
