"""Seeded initialisations of LoRA factors (``init_lora_weights`` = ``True``, ``False``, ``"gaussian"``).

Each returns the *global* (unsharded) tensors of one adapter slot, drawn from a generator seeded
identically on every rank (:func:`seeded_generator`); each rank then keeps its own shard. So
replicated factors start equal on every TP rank, and the adapter does not depend on the TP
layout. Semantics follow PEFT's ``reset_lora_parameters`` and ``nn.Linear``/``nn.Parameter``
defaults.

Device: the tensors are drawn on the CPU (from a CPU generator) on purpose, so an adapter starts
bit-identical on every device and layout; :meth:`LoraFactors.load_global` copies each rank's
shard to the factor's device.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch

InitFn = Callable[[dict, str, int, torch.Generator], dict]


CPU = torch.device("cpu")


def _uniform(shape, bound, g):
    return (torch.rand(shape, generator=g, device=CPU) * 2 - 1) * bound


def _normal(shape, g):
    return torch.randn(shape, generator=g, device=CPU)


def _zeros(shape):
    return torch.zeros(shape, device=CPU)


def default(shapes: dict, kind: str, r: int, g: torch.Generator) -> dict:
    """``True``: A Kaiming-uniform (a = sqrt 5), B zero; embeddings: A zero, B standard normal."""
    if kind == "embedding":
        return {"lora_A": _zeros(shapes["lora_A"]), "lora_B": _normal(shapes["lora_B"], g)}
    out = {"lora_A": _uniform(shapes["lora_A"], 1 / math.sqrt(shapes["lora_A"][1]), g),
           "lora_B": _zeros(shapes["lora_B"])}
    if "lora_bias" in shapes:
        out["lora_bias"] = _zeros(shapes["lora_bias"])
    return out


def gaussian(shapes: dict, kind: str, r: int, g: torch.Generator) -> dict:
    """``"gaussian"``: A ~ N(0, 1/r^2), B zero (embeddings as ``True``)."""
    out = default(shapes, kind, r, g)
    if kind != "embedding":
        out["lora_A"] = _normal(shapes["lora_A"], g) / r
    return out


def uniform(shapes: dict, kind: str, r: int, g: torch.Generator) -> dict:
    """``False``: no LoRA init, i.e. the default init of ``nn.Linear`` (or ``randn`` for embeddings)."""
    if kind == "embedding":
        return {"lora_A": _normal(shapes["lora_A"], g), "lora_B": _normal(shapes["lora_B"], g)}
    out = {"lora_A": _uniform(shapes["lora_A"], 1 / math.sqrt(shapes["lora_A"][1]), g),
           "lora_B": _uniform(shapes["lora_B"], 1 / math.sqrt(r), g)}
    if "lora_bias" in shapes:
        out["lora_bias"] = _uniform(shapes["lora_bias"], 1 / math.sqrt(r), g)
    return out


def seeded_generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``names`` (adapter, module, slot): equal on every rank."""
    digest = hashlib.sha256("/".join((str(seed),) + names).encode()).digest()
    return torch.Generator(device=CPU).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
