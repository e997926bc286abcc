"""``EvaConfig``: PEFT's EVA sub-configuration (``LoraConfig(eva_config=...)``), field for field.

EVA (Explained Variance Adaptation, https://arxiv.org/abs/2410.07170) initialises ``lora_A`` with
the top right-singular vectors of each adapted layer's input activations, and redistributes the
total rank budget across layers by explained variance. The fields and their checks follow
``peft.EvaConfig``; it round trips through ``adapter_config.json`` as a plain dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EvaConfig:
    """EVA settings.

    Attributes:
        rho: a layer may receive up to ``round(r * rho)`` ranks (>= 1; 1 means no redistribution).
        tau: cosine-similarity threshold of consecutive components for early stopping, in [0, 1].
        use_label_mask: ignore tokens whose label equals ``label_mask_value``.
        label_mask_value: the ignored label (default -100).
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale ``lora_alpha`` by ``new_r / r`` when a layer's rank changes.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rho, (int, float)) or isinstance(self.rho, bool) or self.rho < 1.0:
            raise ValueError(f"eva_config.rho must be a number >= 1.0 (1.0: no rank redistribution), got {self.rho!r}")
        if not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"eva_config.tau must lie in [0, 1], got {self.tau!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def as_eva_config(value) -> EvaConfig | None:
    """``None``, an ``EvaConfig``, or its dict (from ``adapter_config.json``) -> ``EvaConfig``."""
    if value is None or isinstance(value, EvaConfig):
        return value
    if isinstance(value, dict):
        return EvaConfig(**value)
    if hasattr(value, "rho") and hasattr(value, "tau"):  # peft.EvaConfig
        return EvaConfig(**{k: getattr(value, k) for k in EvaConfig.__dataclass_fields__})
    raise ValueError(f"eva_config must be an EvaConfig or a dict of its fields, got {type(value).__name__}")
