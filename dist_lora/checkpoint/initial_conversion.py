"""PiSSA / OLoRA adapters as plain LoRA on the *original* base (PEFT's ``subtract_mutated_init``).

PiSSA and OLoRA move ``scaling * B0 A0`` out of the base weight: training runs on
``W_res = W - s B0 A0`` with an adapter ``(A, B)``, so ``W_res + s B A = W + s (B A - B0 A0)``.
That difference is itself a LoRA adapter of twice the rank on the unmodified ``W``:

    A' = [A; A0]  [2r, in]      B' = [B, -B0]  [out, 2r]      r' = 2r, alpha' = 2 alpha

(``alpha' = sqrt(2) alpha`` with rsLoRA), which keeps the scaling. This is what PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes. The initial adapter
``(A0, B0)`` is the one :func:`dist_lora.export_peft` wrote right after ``apply_lora``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_lora.config.lora import LoraConfig


def doubled_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps ``alpha / r`` (``alpha / sqrt r`` with rsLoRA) when r doubles."""
    return alpha * 2 ** 0.5 if use_rslora else alpha * 2


def subtract_initial(state: dict[str, torch.Tensor], config: LoraConfig, modules: dict[str, tuple[int, float]],
                     initial_dir: str | Path) -> tuple[dict, LoraConfig, dict]:
    """``(state, config, modules)`` of the plain-LoRA equivalent of the adapter ``state`` (PEFT
    keys, global tensors) given the initial adapter in PEFT format at ``initial_dir``.

    Raises ``ValueError`` when the adapter cannot be converted (DoRA, lora_bias) or the initial
    adapter does not match (missing file, key or shape)."""
    if config.use_dora or config.lora_bias:
        raise ValueError("path_initial_model_for_weight_conversion: DoRA magnitudes and lora_bias have no "
                         "plain-LoRA equivalent on the original base; export without the conversion")
    weights = Path(initial_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"path_initial_model_for_weight_conversion: {weights} does not exist; export the adapter "
                         f"with export_peft right after apply_lora (before training) to that directory")
    initial = load_file(str(weights))
    out = {}
    for key, tensor in state.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            out[key] = tensor
            continue
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            found = "missing" if start is None else f"of shape {tuple(start.shape)}"
            raise ValueError(f"path_initial_model_for_weight_conversion: {key} is {found} in {weights}, "
                             f"expected shape {tuple(tensor.shape)}; was it exported from this adapter's initial state?")
        start = start.to(tensor.dtype)
        out[key] = torch.cat([tensor, start], 0) if ".lora_A." in key else torch.cat([tensor, -start], 1)
    converted = config.copy()
    converted.r = 2 * config.r
    converted.lora_alpha = doubled_alpha(config.lora_alpha, config.use_rslora)
    doubled = {name: (2 * r, doubled_alpha(alpha, config.use_rslora)) for name, (r, alpha) in modules.items()}
    return out, converted, doubled
