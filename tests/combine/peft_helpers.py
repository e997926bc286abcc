"""Reference helpers: PEFT's ``add_weighted_adapter`` with dist_lora's DARE masks, SVD signs.

PEFT draws DARE masks with torch's global RNG (``merge_utils.random_pruning``), which no sharded
run can reproduce. These patches replace only that draw: for the tensor PEFT is pruning (which
module, ``lora_A`` / ``lora_B`` / the delta weight, which source adapter) they return the global
mask :func:`dist_lora.combine.task_arithmetic.dare_mask` gives the same tensor, so the rest of the
computation is PEFT's own code.
"""

from __future__ import annotations

from unittest import mock

import torch

from dist_lora.combine.task_arithmetic import dare_mask


def peft_with_our_dare_masks(model, new_name: str, seed: int):
    """Patches under which PEFT's DARE draws our seeded global mask of the same tensor."""
    from peft.tuners.lora.model import LoraModel
    from peft.utils import merge_utils

    names = {id(m): n for n, m in model.base_model.model.named_modules()}
    current = {}
    generalized = LoraModel._generalized_task_arithmetic_weighted_adapter
    svd = LoraModel._svd_generalized_task_arithmetic_weighted_adapter

    def note(target, adapters, kind):
        # our masks are named by the source's position in ``adapters``; PEFT skips absent ones
        present = [i for i, a in enumerate(adapters) if a in target.lora_A or a in target.lora_embedding_A]
        current.update(module=names[id(target)], calls=0, kind=kind, n=len(present), present=present,
                       embedding=bool(target.lora_embedding_A))

    def patched_generalized(self, combination_type, adapters, weights, target, *args, **kwargs):
        note(target, adapters, "factors")
        return generalized(self, combination_type, adapters, weights, target, *args, **kwargs)

    def patched_svd(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs):
        note(target, adapters, "delta")
        return svd(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs)

    def random_pruning(tensor, density, rescale):
        i, n = current["calls"], current["n"]
        current["calls"] += 1
        if current["kind"] == "delta":
            tensor_name, position = "delta", i
        else:
            tensor_name, position = ("lora_A", i) if i < n else ("lora_B", i - n)
        transposed = current["kind"] == "delta" and current["embedding"]  # PEFT's embedding delta is (B A)^T
        shape = tuple(tensor.shape[::-1]) if transposed else tuple(tensor.shape)
        position = current["present"][position]
        mask = dare_mask(shape, density, seed, new_name, current["module"], tensor_name, str(position))
        pruned = tensor * (mask.t() if transposed else mask)
        return pruned / density if rescale else pruned

    return [mock.patch.object(LoraModel, "_generalized_task_arithmetic_weighted_adapter", patched_generalized),
            mock.patch.object(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", patched_svd),
            mock.patch.object(merge_utils, "random_pruning", random_pruning)]


def pairs(state: dict):
    """(A key, B key) of every module of a PEFT state dict."""
    for key in state:
        if key.endswith("lora_A.weight") or key.endswith("lora_embedding_A"):
            yield key, key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")


def signed(ref: dict) -> dict:
    """PEFT's SVD factors with each singular pair signed as ours are (sum of cubes of the A row
    >= 0): LAPACK's signs are arbitrary, ours must not depend on the layout."""
    out = dict(ref)
    for a, b in pairs(ref):
        signs = torch.where((ref[a].double() ** 3).sum(1) < 0, -1.0, 1.0).to(ref[a].dtype)
        out[a], out[b] = ref[a] * signs[:, None], ref[b] * signs
    return out
