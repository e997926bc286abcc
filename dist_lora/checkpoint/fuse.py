"""Per-projection PEFT adapters -> one exact adapter per fused Megatron layer (``import_peft(fused=True)``).

A fused layer (``linear_qkv``, GLU ``linear_fc1``) computes q, k, v (gate, up) from one input.
PEFT adapters with their own A's on those projections become one adapter on the fused layer:
``A`` [sum r_i, in] stacks their A's, ``B`` is block-structured (projection i's rows carry
``s_i B_i`` in its own columns, zero elsewhere) with scaling 1, so the fused adapter computes
exactly what the per-projection adapters do. DoRA adapters fuse only when every projection of
the layer has one; embedding adapters never fuse.
"""

from __future__ import annotations

import torch

from dist_lora.adapters.model import view
from dist_lora.checkpoint.peft_names import adapter_modules, hf_module_table, peft_key
from dist_lora.config.lora import LoraConfig


def fuse_projections(model, config: LoraConfig, tensors: dict) -> tuple[LoraConfig, dict]:
    """Per-projection PEFT adapters -> one exact adapter per fused Megatron layer (see import_peft)."""
    modules = adapter_modules(config, tensors)
    fused_layers: dict[str, list[str]] = {}  # every fused layer of the model, on every stage alike
    for hf, (megatron, _, fused) in hf_module_table(view(model).spec).items():
        if fused:
            fused_layers.setdefault(megatron, []).append(hf)
    rank_pattern, alpha_pattern, targets, out = {}, {}, [], {}
    consumed = set()
    for megatron, names in fused_layers.items():
        present = [n for n in names if n in modules]
        if not present:
            continue
        if any("m" in modules[n] for n in present) and len(present) != len(names):
            raise ValueError(f"a fused DoRA adapter on {megatron} needs all of {names}; import per projection")
        if any("emb_A" in modules[n] for n in present):
            raise ValueError(f"{megatron}: embedding adapters cannot be fused")
        total = sum(modules[n]["A"].shape[0] for n in present)
        a = torch.cat([modules[n]["A"] for n in present])
        offset = 0
        blocks = {}
        for n in names:
            rows = _rows_of(n, modules, model)
            block = torch.zeros(rows, total, dtype=a.dtype, device=a.device)
            if n in modules:
                r = modules[n]["A"].shape[0]
                block[:, offset:offset + r] = modules[n]["B"] * modules[n]["scaling"]
                offset += r
            blocks[n] = block
        for n in names:
            out[peft_key(n, "linear", "lora_A")] = a
            out[peft_key(n, "linear", "lora_B")] = blocks[n]
            for role, fill in (("lora_bias", "lora_bias"), ("lora_magnitude_vector", "m")):
                if any(fill in modules[p] for p in present):
                    value = modules[n].get(fill) if n in modules else None
                    if role == "lora_bias":
                        value = (value * modules[n]["scaling"]) if value is not None else blocks[n].new_zeros(blocks[n].shape[0])
                    out[peft_key(n, "linear", role)] = value
        consumed.update(present)
        targets.append(megatron)
        rank_pattern[megatron] = total
        alpha_pattern[megatron] = total  # scaling 1: each block carries its own
    for n, parts in modules.items():
        if n in consumed:
            continue
        kind = "embedding" if "emb_A" in parts else "linear"
        r = (parts["A"] if kind == "linear" else parts["emb_A"]).shape[0]
        targets.append(n)
        rank_pattern[n] = r
        alpha_pattern[n] = parts["scaling"] * r  # the same scaling without rsLoRA
        for role, key in (("lora_A", "A"), ("lora_B", "B"), ("lora_bias", "lora_bias"),
                          ("lora_magnitude_vector", "m"), ("lora_A", "emb_A"), ("lora_B", "emb_B")):
            if key in parts:
                out[peft_key(n, kind, role)] = parts[key]
    saved = {k: v for k, v in tensors.items() if not any(s in k for s in (".lora_",))}
    out.update(saved)
    fused_config = config.copy()
    fused_config.target_modules = sorted(targets)
    fused_config.use_rslora = False
    fused_config.rank_pattern, fused_config.alpha_pattern = rank_pattern, alpha_pattern
    fused_config.layers_to_transform = fused_config.layers_pattern = fused_config.exclude_modules = None
    fused_config.validate()
    return fused_config, out


def _rows_of(name: str, modules: dict, model) -> int:
    """Output rows of HF projection ``name`` (from its adapter, or from the model's shapes)."""
    if name in modules:
        return modules[name]["B"].shape[0]
    spec = view(model).spec
    leaf = name.rsplit(".", 1)[1]
    return {"q_proj": spec.num_heads * spec.head_dim, "k_proj": spec.num_kv_heads * spec.head_dim,
            "v_proj": spec.num_kv_heads * spec.head_dim}.get(leaf, spec.ffn_hidden_size)
