"""Initialisation methods of LoRA factors, by ``init_lora_weights`` value (one table).

Each method returns the *global* (unsharded) tensors of one adapter slot, drawn from a
generator seeded identically on every rank; each rank then keeps its own shard. So replicated
factors start equal on every TP rank, and the adapter does not depend on the TP layout.
Semantics follow PEFT's ``reset_lora_parameters`` and ``nn.Linear``/``nn.Parameter`` defaults.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch

InitFn = Callable[[dict, str, int, torch.Generator], dict]


def _uniform(shape, bound, g):
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def _default(shapes: dict, kind: str, r: int, g: torch.Generator) -> dict:
    """``True``: A Kaiming-uniform (a = sqrt 5), B zero; embeddings: A zero, B standard normal."""
    if kind == "embedding":
        return {"lora_A": torch.zeros(shapes["lora_A"]), "lora_B": torch.randn(shapes["lora_B"], generator=g)}
    out = {"lora_A": _uniform(shapes["lora_A"], 1 / math.sqrt(shapes["lora_A"][1]), g),
           "lora_B": torch.zeros(shapes["lora_B"])}
    if "lora_bias" in shapes:
        out["lora_bias"] = torch.zeros(shapes["lora_bias"])
    return out


def _gaussian(shapes: dict, kind: str, r: int, g: torch.Generator) -> dict:
    """``"gaussian"``: A ~ N(0, 1/r^2), B zero (embeddings as ``True``)."""
    out = _default(shapes, kind, r, g)
    if kind != "embedding":
        out["lora_A"] = torch.randn(shapes["lora_A"], generator=g) / r
    return out


def _random(shapes: dict, kind: str, r: int, g: torch.Generator) -> dict:
    """``False``: no LoRA init, i.e. the default init of ``nn.Linear`` (or ``randn`` for embeddings)."""
    if kind == "embedding":
        return {"lora_A": torch.randn(shapes["lora_A"], generator=g), "lora_B": torch.randn(shapes["lora_B"], generator=g)}
    out = {"lora_A": _uniform(shapes["lora_A"], 1 / math.sqrt(shapes["lora_A"][1]), g),
           "lora_B": _uniform(shapes["lora_B"], 1 / math.sqrt(r), g)}
    if "lora_bias" in shapes:
        out["lora_bias"] = _uniform(shapes["lora_bias"], 1 / math.sqrt(r), g)
    return out


# "eva": as PEFT, the default until dist_lora.eva.initialize_lora_eva_weights sets A from data.
INIT_METHODS: dict[object, InitFn] = {True: _default, False: _random, "gaussian": _gaussian, "eva": _default}


def check_init_method(value) -> None:
    if value not in INIT_METHODS or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        known = ", ".join(repr(k) for k in INIT_METHODS)
        raise ValueError(f"init_lora_weights={value!r} is not a known initialisation; known: {known}")


def initial_factors(method, shapes: dict, kind: str, r: int, seed: int, *names: str) -> dict:
    """Global initial tensors of one adapter slot; the generator is seeded from ``seed`` and
    ``names`` (adapter, module, slot), so every rank draws the same numbers."""
    check_init_method(method)
    return INIT_METHODS[method](shapes, kind, r, seeded_generator(seed, *names))


def seeded_generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``names``: the same numbers on every rank."""
    digest = hashlib.sha256("/".join((str(seed),) + names).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
