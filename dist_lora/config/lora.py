"""``LoraConfig``: PEFT's LoRA configuration, field for field, as a JSON-round-tripping dataclass.

Field names, defaults and meaning follow ``peft.LoraConfig`` (see PEFT's LoRA reference), so an
``adapter_config.json`` written by PEFT reads into this class and back. Fields of PEFT that
dist_lora does not implement are refused with a clear error when they are set to anything but
their default; purely descriptive ones (``task_type``, ``revision``, ...) are carried along.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from dist_lora.config.eva import EvaConfig, as_eva_config
from dist_lora.config.init_names import check_init_method

BIAS_OPTIONS = ("none", "all", "lora_only")

# PEFT keys dist_lora does not implement, with the value that means "off".
_UNSUPPORTED_DEFAULTS = {
    "fan_in_fan_out": False, "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "corda_config": None, "lora_ga_config": None, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: bits of the quantised base (dist_lora: 4, nf4) and alternating
    quantise / SVD rounds. Pass it as ``LoraConfig(init_lora_weights="loftq", loftq_config=...)``."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class LoraConfig:
    """Configuration of one LoRA / rsLoRA / DoRA adapter (PEFT's ``LoraConfig`` fields).

    Attributes:
        r: LoRA rank (> 0).
        lora_alpha: scaling numerator; scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the adapter input.
        target_modules: module names (list: exact name or ``.``-suffix match), a regex matched
            against the whole module name (str), or ``"all-linear"``. Hugging Face names
            (``q_proj``, ...) and Megatron names (``linear_qkv``, ...) are both understood; an HF
            name inside a fused Megatron layer gives a per-projection adapter on that slice.
        target_parameters: parameter names (exact or ``.``-suffix match, as PEFT): the routed
            experts of mixture-of-experts models, ``["mlp.experts.gate_up_proj",
            "mlp.experts.down_proj"]``; every expert gets its own A and B (PEFT packs them as
            ``lora_A`` [r * E, in], ``lora_B`` [out, r * E]). As in PEFT, ``exclude_modules`` and
            ``layers_to_transform`` do not apply to them, and ``lora_dropout`` must be 0.
        exclude_modules: names (list) or regex (str) never adapted.
        layers_to_transform / layers_pattern: restrict adaptation to these layer indices.
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha``, keys matched as PEFT does
            (``(.*\\.)?key$`` against the module name).
        use_rslora: scaling ``lora_alpha / sqrt(r)``.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of adapted layers).
        lora_bias: a trainable bias on ``lora_B`` (not with DoRA).
        modules_to_save: modules trained fully (a trainable copy per adapter), e.g. ``["lm_head"]``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero), ``False`` (both random) or an
            initialisation method named in :mod:`dist_lora.config.init_names`.
        use_dora: weight-decomposed LoRA (a magnitude vector per output row).
        eva_config: :class:`~dist_lora.config.eva.EvaConfig` (or its dict) for
            ``init_lora_weights="eva"``; defaults to ``EvaConfig()`` then, as in PEFT.
        loftq_config: :class:`LoftQConfig` (stored as a dict) for ``init_lora_weights="loftq"``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    target_parameters: Optional[list[str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    eva_config: Optional[EvaConfig] = None
    loftq_config: dict = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    peft_type: str = "LORA"

    # Fields that training changes (AdaLoRA's learned ``rank_pattern``): loading a checkpoint into
    # an adapter that already exists takes them from the checkpoint's config.
    LEARNED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = list(self.target_parameters)
        self.eva_config = as_eva_config(self.eva_config)
        if self.init_lora_weights == "eva" and self.eva_config is None:
            self.eva_config = EvaConfig()
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is wrong."""
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type={self.peft_type!r}: LoraConfig describes LORA adapters only")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        self.check_shared_fields()
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if self.use_dora and self.lora_bias:
            raise ValueError("lora_bias=True is not supported with DoRA (as in PEFT); set use_dora=False")
        check_init_method(self.init_lora_weights)
        self._validate_loftq()
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ValueError(f"{name} must be a dict of module pattern -> value, got {type(pattern).__name__}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def check_shared_fields(self) -> None:
        """The checks of the fields every adapter method shares with LoRA (scaling numerator,
        dropout, target selection); subclasses' ``validate`` calls them too."""
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern:
            raise ValueError("layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")
        if self.target_parameters is not None and (
                not isinstance(self.target_parameters, list)
                or not all(isinstance(t, str) and t for t in self.target_parameters)):
            raise ValueError(f"target_parameters must be a list of parameter names, got {self.target_parameters!r}")
        if self.target_parameters and float(self.lora_dropout) > 0:
            raise ValueError(f"lora_dropout={self.lora_dropout} does not work with target_parameters (as in PEFT: "
                             f"the dropout of an expert's input cannot be factored out of its weight); set "
                             f"lora_dropout=0")

    def _validate_loftq(self) -> None:
        if not isinstance(self.loftq_config, dict):
            raise ValueError(f"loftq_config must be a LoftQConfig or a dict, got {type(self.loftq_config).__name__}")
        if self.init_lora_weights != "loftq":
            return
        if not self.loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig(loftq_bits=4)")
        unknown = set(self.loftq_config) - {"loftq_bits", "loftq_iter"}
        if unknown:
            raise ValueError(f"loftq_config has unknown keys {sorted(unknown)}; known: loftq_bits, loftq_iter")
        bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
        if bits != 4:
            raise ValueError(f"loftq_bits={bits!r}: dist_lora's LoftQ quantises to 4-bit nf4 only (PEFT's 8-bit "
                             f"path scales whole rows, which row-parallel shards do not hold); use loftq_bits=4")
        if not isinstance(iters, int) or isinstance(iters, bool) or iters <= 0:
            raise ValueError(f"loftq_iter must be a positive integer, got {iters!r}")

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

    def check_loadable(self, saved: "LoraConfig") -> None:
        """Raise ``ValueError`` if tensors saved from an adapter with config ``saved`` cannot load
        into an adapter with this config (another method; shapes are checked per tensor)."""
        if saved.peft_type != self.peft_type:
            raise ValueError(f"the checkpoint's adapter is {saved.peft_type} but this model's adapter is "
                             f"{self.peft_type}; load it into a model whose adapter is {saved.peft_type} (same "
                             f"targets), or into a model without that adapter (loading creates it)")

    # -- JSON round trip ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` keys and values (lists in the order they were given)."""
        out = dataclasses.asdict(self)
        out.update(copy.deepcopy(_UNSUPPORTED_DEFAULTS))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read PEFT's ``adapter_config.json`` keys; unsupported features are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _UNSUPPORTED_DEFAULTS:
                if value not in (_UNSUPPORTED_DEFAULTS[key], None, {}, False):
                    raise ValueError(f"{key}={value!r} is not supported by dist_lora")
            else:
                ignored.append(key)
        if ignored:
            warnings.warn(f"ignored adapter_config.json keys: {sorted(ignored)}", stacklevel=2)
        return cls(**kwargs)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: str | Path) -> "LoraConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def copy(self) -> "LoraConfig":
        return copy.deepcopy(self)
