"""``ModelSpec``: the dimensions of a Hugging Face decoder checkpoint, read and validated once.

Everything here is computed from ``config.json`` alone (plus the pipeline layout the user chose),
so every rank reaches the same verdict on a bad config without talking to the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_lora.models.families import Family, family_for
from dist_lora.models.pipeline_layout import stage_range, stage_sizes

_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# HF activation name -> the name dist_lora's model builder knows (models/build.py)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of one decoder model (Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 layout)."""

    family: Family
    hf_config: dict = field(repr=False, compare=False)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    rope_llama3_factor: float | None
    norm_eps: float
    max_positions: int
    sliding_window: int | None
    # per layer: "sliding_attention" or "full_attention" (``None``: the window, if any, on every layer)
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None  # RoPE base of the sliding-window layers (Gemma 3)
    softmax_scale: float | None = None  # query_pre_attn_scalar ** -0.5 (Gemma 3); None: head_dim ** -0.5
    activation: str = "silu"  # "silu" | "gelu_tanh" (GeGLU with tanh GELU)
    # pipeline layout (models.from_pretrained(first_stage_layers=, last_stage_layers=)); None: automatic
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def features(self) -> frozenset[str]:
        """Feature flags that select optional table entries (see ``WeightEntry.when``)."""
        flags = set()
        if self.qkv_bias:
            flags.add("qkv_bias")
        flags.add("tied" if self.tied_embeddings else "untied")
        return frozenset(flags)

    def padded_vocab(self, tp_size: int) -> int:
        """Vocabulary rounded up to a multiple of the TP size (Megatron shards it evenly)."""
        return math.ceil(self.vocab_size / tp_size) * tp_size

    def with_pipeline(self, first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> ModelSpec:
        """This spec with the first / last pipeline stage holding the given layer counts."""
        return dataclasses.replace(self, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)

    def valid_tp_sizes(self) -> list[int]:
        g = math.gcd(self.num_heads, self.num_kv_heads, self.ffn_hidden_size)
        return [t for t in range(1, g + 1) if g % t == 0]

    def check_layout(self, tp_size: int, pp_size: int) -> None:
        """Raise ``ValueError`` naming the setting that a TP / PP size or stage layout breaks."""
        valid = ", ".join(map(str, self.valid_tp_sizes()))
        for value, name in ((self.num_heads, "num_attention_heads"), (self.num_kv_heads, "num_key_value_heads"),
                            (self.ffn_hidden_size, "intermediate_size")):
            if value % tp_size:
                raise ValueError(
                    f"tensor_parallel={tp_size} does not divide {name}={value}; "
                    f"valid tensor_parallel sizes for this model: {valid}"
                )
        self.stage_sizes(pp_size)

    def stage_sizes(self, pp_size: int) -> tuple[int, ...]:
        """Layers per pipeline stage (see :mod:`dist_lora.models.pipeline_layout`)."""
        return stage_sizes(self.num_layers, pp_size, self.first_stage_layers, self.last_stage_layers)

    def layers_of_stage(self, pp_rank: int, pp_size: int) -> range:
        """Global indices of the decoder layers on pipeline stage ``pp_rank``."""
        return stage_range(self.stage_sizes(pp_size), pp_rank)

    def stage_of_layer(self, layer: int, pp_size: int) -> int:
        """The pipeline stage that holds global layer ``layer``."""
        sizes = self.stage_sizes(pp_size)
        for stage in range(pp_size):
            if layer in stage_range(sizes, stage):
                return stage
        raise ValueError(f"layer {layer} does not exist in a {self.num_layers}-layer model")


def _rope_params(params: dict, fallback_theta: float) -> tuple[float, float | None]:
    """RoPE base and the llama3 scaling factor (``None`` when unscaled) of one parameter dict."""
    theta = float(params.get("rope_theta", fallback_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        for key, expected in _LLAMA3_ROPE_DEFAULTS.items():
            if float(params.get(key, expected)) != expected:
                raise ValueError(
                    f"llama3 rope scaling with {key}={params[key]} is not supported "
                    f"(Megatron-Core implements {key}={expected})"
                )
        return theta, float(params.get("factor", 8.0))
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: default, llama3")


def _rope(config: dict, family: Family) -> tuple[float, float | None, float | None]:
    """(RoPE base, llama3 factor, RoPE base of sliding-window layers or None).

    Reads the flat form (``rope_theta`` / ``rope_scaling`` / ``rope_parameters``) and the per
    layer-type form of transformers 5 (``rope_parameters: {full_attention: .., sliding_attention: ..}``).
    """
    params = dict(config.get("rope_parameters") or {})
    default_theta = float(config.get("rope_theta", family.rope_theta_default))
    if FULL in params or SLIDING in params:
        theta, llama3 = _rope_params(params.get(FULL) or {}, default_theta)
        local = params.get(SLIDING)
    else:
        theta, llama3 = _rope_params({**(config.get("rope_scaling") or {}), **params}, default_theta)
        local = None
    if family.local_rope_key is None:
        return theta, llama3, None
    if local is None:
        local = {"rope_theta": config.get(family.local_rope_key, family.local_rope_default)}
    local_theta, local_scaled = _rope_params(local, family.local_rope_default)
    if local_scaled is not None:
        raise ValueError("rope scaling on the sliding-window layers is not supported")
    return theta, llama3, local_theta


def _layer_types(config: dict, family: Family, num_layers: int, window: int | None) -> tuple[str, ...] | None:
    """Each layer's attention kind when the model has a sliding window (``None``: no window)."""
    if window is None:
        return None
    types = config.get("layer_types")
    if types is None:
        if family.window_layers == "every_nth_full":  # Gemma 3: one full layer after n - 1 sliding ones
            n = int(config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6)))
            types = [SLIDING if (i + 1) % n else FULL for i in range(num_layers)]
        elif family.window_layers == "from_max_window_layers":  # Qwen: layers >= max_window_layers
            first = int(config.get("max_window_layers", num_layers))
            types = [SLIDING if i >= first else FULL for i in range(num_layers)]
        else:
            types = [SLIDING] * num_layers
    types = tuple(types)
    unknown = sorted(set(types) - {SLIDING, FULL})
    if unknown or len(types) != num_layers:
        raise ValueError(f"layer_types must list {num_layers} entries of {SLIDING!r} / {FULL!r}; got {list(types)}")
    return types


def _unsupported(config: dict, family: Family) -> None:
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if config.get("attention_bias"):
        raise ValueError(
            "attention_bias=True (bias on q, k, v and o) is not supported; Qwen2-style q/k/v-only "
            "bias is"
        )
    for key in family.must_be_off:
        if config.get(key):
            raise ValueError(f"{key}={config[key]!r} is not supported by dist_lora's {family.name} models")


def spec_from_config(config: dict[str, Any]) -> ModelSpec:
    """Validate an HF ``config.json`` dict and derive the model's dimensions."""
    family = family_for(config.get("model_type"))
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
    act = config.get(family.activation_key, family.activation_default)
    if act not in _ACTIVATIONS:
        raise ValueError(f"{family.activation_key}={act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    _unsupported(config, family)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    window = None
    if family.sliding_window_key and config.get(family.sliding_window_key):
        switch = family.sliding_window_switch
        if switch is None or config.get(switch):
            window = int(config[family.sliding_window_key])
    if window is None and family.local_rope_key is not None:
        raise ValueError(f"{family.name} models need {family.sliding_window_key} (their sliding-window layers "
                         f"use a RoPE base of their own); config.json has {family.sliding_window_key}=None")
    types = _layer_types(config, family, layers, window)
    if types is not None and SLIDING not in types:
        window, types = None, None
    theta, llama3, local_theta = _rope(config, family)
    scalar = None
    if family.query_pre_attn_scalar_default is not None:
        scalar = config.get("query_pre_attn_scalar", family.query_pre_attn_scalar_default)
    return ModelSpec(
        family=family,
        hf_config=dict(config),
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", family.tied_default)),
        qkv_bias=family.qkv_bias,
        rope_theta=theta,
        rope_llama3_factor=llama3,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
        sliding_window=window,
        layer_types=types if types is not None and FULL in types else None,
        local_rope_theta=local_theta if window is not None else None,
        softmax_scale=None if scalar is None else float(scalar) ** -0.5,
        activation=_ACTIVATIONS[act],
    )


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Read ``config.json`` of an HF model directory into a ``ModelSpec``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return spec_from_config(config)
