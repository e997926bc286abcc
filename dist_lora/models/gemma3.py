"""Gemma 3 text models: the pieces Megatron-Core's local GPT layer lacks, and their layer spec.

Megatron-Core already has: per-head q / k norms (``q_layernorm`` / ``k_layernorm``), the
attention scale (``TransformerConfig.softmax_scale = query_pre_attn_scalar ** -0.5``), sliding
windows per layer (``window_size`` with the ``window_attn_skip_freq`` list of HF's
``layer_types``), GeGLU (``gated_linear_unit`` with a tanh GELU) and the tied, vocabulary-parallel
embedding. What it lacks on the local (non-Transformer-Engine) path, and dist_lora adds here:

* **two RoPE bases**: full-attention layers use ``rope_theta`` (the model's rotary embedding),
  sliding-window layers their own ``rope_local_base_freq``. :class:`Gemma3SelfAttention` holds
  a second ``RotaryEmbedding`` on sliding layers and uses it instead of the model's;
* **post-attention and post-feedforward norms** (Gemma's "sandwich" norms, applied to the
  attention / MLP output before the residual add): :class:`Gemma3SelfAttention` applies the
  first to its output, a forward hook on each MLP the second (:func:`finish_gemma3`). They sit
  outside ``linear_proj`` /
  ``linear_fc2``, so an adapter on o_proj / down_proj adds its delta *before* the norm, as PEFT's
  does on the Hugging Face model. The output is ``[s, b, h]`` (``[s/p, b, h]`` under sequence
  parallelism: the norm is elementwise over ``h``, so it is exact on a sequence shard);
* **(1 + weight) RMSNorm**: :class:`dist_lora.models.norm.ZeroCenteredRMSNorm`, chosen by
  ``layernorm_zero_centered_gamma`` in the config;
* **embeddings scaled by sqrt(hidden_size)**: a forward hook on the model's embedding module
  (:func:`finish_gemma3`), so the scale also applies to an embedding adapter's delta (PEFT
  scales LoRA's embedding delta by the base layer's ``embed_scale`` too).
"""

from __future__ import annotations

import torch

from dist_lora.integrations.megatron import (
    ModuleSpec,
    RotaryEmbedding,
    SelfAttention,
    is_layer_window_attention,
)
from dist_lora.models.layer_specs import local_layer_spec
from dist_lora.models.norm import TorchNorm
from dist_lora.models.spec import ModelSpec


class Gemma3SelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` with the sliding layers' own RoPE base and a post-attention norm.

    ``local_rope_base``: RoPE base of sliding-window layers (this layer is one when Megatron's
    ``is_layer_window_attention`` says so for its global ``layer_number``). Output: the normed
    attention output ``[s, b, h]`` (``[s/p, b, h]`` under sequence parallelism) and ``None``
    (Gemma has no linear biases).
    """

    def __init__(self, config, submodules, layer_number: int, *args, local_rope_base: float = 10000.0, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.post_layernorm = TorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.local_rotary = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            self.local_rotary = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=local_rope_base,
                use_cpu_initialization=config.use_cpu_initialization, cp_group=self.pg_collection.cp,
            )

    def forward(self, hidden_states, *args, **kwargs):
        rotary = kwargs.get("rotary_pos_emb")
        if self.local_rotary is not None and rotary is not None:
            length = (rotary[0] if isinstance(rotary, tuple) else rotary).shape[0]
            kwargs["rotary_pos_emb"] = self.local_rotary(length)
        output, bias = super().forward(hidden_states, *args, **kwargs)
        if bias is not None:
            output = output + bias
        return self.post_layernorm(output), None


class _PostNorm:
    """Forward hook: normalise the (output, bias) of a Megatron MLP with its ``post_layernorm``."""

    def __call__(self, module, args, output):
        out, bias = output
        if bias is not None:
            out = out + bias
        return module.post_layernorm(out), None


class _ScaleOutput:
    """Forward hook: the module's output times ``scale`` (cast to the output's dtype, as HF does)."""

    def __init__(self, scale: float):
        self.scale = torch.tensor(scale, dtype=torch.float32)

    def __call__(self, module, args, output):
        return output * self.scale.to(device=output.device, dtype=output.dtype)


def gemma3_layer_spec(spec: ModelSpec) -> ModuleSpec:
    """Megatron's local layer (q / k norms, our norms) with :class:`Gemma3SelfAttention`."""
    layer = local_layer_spec(spec)
    attention = layer.submodules.self_attention
    attention.module = Gemma3SelfAttention
    attention.params = {**attention.params, "local_rope_base": spec.local_rope_theta or spec.rope_theta}
    return layer


def finish_gemma3(model: torch.nn.Module, spec: ModelSpec) -> None:
    """After Megatron built the stage: a post-feedforward norm on every layer's MLP
    (``mlp.post_layernorm``, applied by a forward hook: Megatron-Core 0.16 and 0.19 build a
    layer's MLP from different spec forms, so a subclass of ``MLP`` would not fit both), and the
    sqrt(hidden_size) embedding scale on the first stage."""
    for layer in model.decoder.layers:
        layer.mlp.post_layernorm = TorchNorm(model.config, spec.hidden_size, eps=model.config.layernorm_epsilon)
        layer.mlp.register_forward_hook(_PostNorm())
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(_ScaleOutput(spec.hidden_size ** 0.5))
