"""Hugging Face <-> Megatron-Core name and layout tables, one per model family.

Each entry maps one Megatron parameter (per layer where the name holds ``{layer}``, the
*global* layer index) to the Hugging Face tensor(s) it is made of, and names the layout that
turns the HF tensor(s) into this rank's shard. Layouts (see :mod:`dist_lora.models.layouts`):

``replicated``  the same full tensor on every TP rank (norm weights)
``column``      split along dim 0 (output features)
``row``         split along dim 1 (input features)
``vocab``       split along dim 0 after padding the vocabulary to a multiple of TP
``qkv``         q, k, v fused per query group: ``[ng x (nq/ng + 2) x head_dim]`` rows, split by group
``glu``         gate and up fused per rank: local ``[gate_i; up_i]`` (partition stride 2)

``when`` names a feature of the checkpoint that must be present for the entry to apply:
``qkv_bias`` (Qwen2), ``untied`` (a separate ``lm_head``) or ``tied`` (the output layer reads
the embedding). An entry applies on a rank only where the Megatron parameter exists (its PP
stage). A new family is a new table (composed of the pieces below where they fit) and, where
its layers differ from Megatron's local GPT layer, a layer-spec function named by
``Family.layer_spec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WeightEntry:
    megatron: str
    hf: tuple[str, ...]
    layout: str
    when: str | None = None

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron


@dataclass(frozen=True)
class Family:
    """A model family: which HF configs it accepts, how its weights map, how it is built.

    ``layer_spec`` names the Megatron layer-spec function in ``models/build.py``'s ``LAYER_SPECS``
    table; the other fields are read by ``models/spec.py`` (config keys and defaults) and by the
    layer-spec functions (architecture switches).
    """

    name: str
    model_types: tuple[str, ...]
    weights: tuple[WeightEntry, ...] = field(repr=False)
    layer_spec: str = "decoder"  # key of models/build.py LAYER_SPECS
    qkv_bias: bool = False  # q/k/v projections always carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys over head_dim (Qwen3, Gemma 3)
    zero_centered_norms: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    sliding_window_key: str | None = None  # config key of a sliding attention window, if any
    sliding_window_switch: str | None = None  # config key that turns the window on, if any
    # which layers the window applies to when config.json has no ``layer_types``:
    # "all" | "from_max_window_layers" (Qwen) | "every_nth_full" (Gemma 3's sliding_window_pattern)
    window_layers: str = "all"
    local_rope_key: str | None = None  # config key of the sliding layers' own RoPE base (Gemma 3)
    local_rope_default: float = 10000.0
    rope_theta_default: float = 10000.0
    activation_key: str = "hidden_act"
    activation_default: str = "silu"
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out
    query_pre_attn_scalar_default: float | None = None  # attention scale 1/sqrt(this) (Gemma 3)
    must_be_off: tuple[str, ...] = ()  # config keys whose feature dist_lora does not implement


_L = "model.layers.{layer}."
_M = "decoder.layers.{layer}."

# Pieces a family's table is composed of (a mixture-of-experts family reuses all but DENSE_MLP).

EMBEDDING = (WeightEntry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),)
ATTENTION = (
    WeightEntry(
        _M + "self_attention.linear_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        "qkv",
    ),
    WeightEntry(
        _M + "self_attention.linear_qkv.bias",
        (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
        "qkv",
        when="qkv_bias",
    ),
    WeightEntry(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "row"),
)
# Per-head q / k RMSNorm over head_dim (Megatron's q_layernorm / k_layernorm), replicated over TP.
QK_NORM = (
    WeightEntry(_M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "replicated"),
    WeightEntry(_M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "replicated"),
)
DENSE_MLP = (
    WeightEntry(
        _M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "glu"
    ),
    WeightEntry(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "row"),
)
OUTPUT = (
    WeightEntry("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    WeightEntry("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
    # Tied embeddings: a last pipeline stage that is not also the first holds its own copy.
    WeightEntry("output_layer.weight", ("model.embed_tokens.weight",), "vocab", when="tied"),
)
INPUT_NORM = (WeightEntry(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",), "replicated"),)
PRE_MLP_NORM = (
    WeightEntry(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), "replicated"),
)

# A Llama-style decoder: pre-norm attention and SwiGLU MLP.
_DECODER = EMBEDDING + INPUT_NORM + ATTENTION + PRE_MLP_NORM + DENSE_MLP + OUTPUT

LLAMA = Family("llama", ("llama",), _DECODER)
MISTRAL = Family("mistral", ("mistral",), _DECODER, sliding_window_key="sliding_window")
_QWEN_WINDOW = dict(sliding_window_key="sliding_window", sliding_window_switch="use_sliding_window",
                    window_layers="from_max_window_layers")
QWEN2 = Family("qwen2", ("qwen2",), _DECODER, qkv_bias=True, **_QWEN_WINDOW)
# Qwen3 (dense): Qwen2 without q/k/v bias, with q/k norms; head_dim is its own config key.
QWEN3 = Family("qwen3", ("qwen3",), EMBEDDING + INPUT_NORM + ATTENTION + QK_NORM + PRE_MLP_NORM + DENSE_MLP
               + OUTPUT, qk_norm=True, **_QWEN_WINDOW)
# Gemma 3 text: four norms per layer (Gemma's names), q/k norms, (1 + w) RMSNorm, GeGLU,
# sqrt(hidden)-scaled embeddings, interleaved sliding-window / full layers with two RoPE bases.
# The post-attention / post-feedforward norms and the embedding scale are dist_lora's own
# (models/gemma3.py: Builder "gemma3" in models/build.py).
_GEMMA3_LAYER = (
    INPUT_NORM + ATTENTION + QK_NORM
    + (WeightEntry(_M + "self_attention.post_layernorm.weight", (_L + "post_attention_layernorm.weight",),
                   "replicated"),
       WeightEntry(_M + "pre_mlp_layernorm.weight", (_L + "pre_feedforward_layernorm.weight",), "replicated"))
    + DENSE_MLP
    + (WeightEntry(_M + "mlp.post_layernorm.weight", (_L + "post_feedforward_layernorm.weight",), "replicated"),)
)
GEMMA3 = Family(
    "gemma3",
    ("gemma3_text",),
    EMBEDDING + _GEMMA3_LAYER + OUTPUT,
    layer_spec="gemma3",
    qk_norm=True,
    zero_centered_norms=True,
    sliding_window_key="sliding_window",
    window_layers="every_nth_full",
    local_rope_key="rope_local_base_freq",
    rope_theta_default=1_000_000.0,
    activation_key="hidden_activation",
    activation_default="gelu_pytorch_tanh",
    tied_default=True,
    query_pre_attn_scalar_default=256.0,
    must_be_off=("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"),
)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)


def family_for(model_type: str | None) -> Family:
    """The family of an HF ``model_type``; a clear error for anything else."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; dist_lora supports: {known}")
