"""Initialisation methods of LoRA factors, by ``init_lora_weights`` value (one table).

Each method returns the *global* (unsharded) tensors of one adapter slot, drawn from a
generator seeded identically on every rank; each rank then keeps its own shard. So replicated
factors start equal on every TP rank, and the adapter does not depend on the TP layout.
Semantics follow PEFT's ``reset_lora_parameters`` and ``nn.Linear``/``nn.Parameter`` defaults.

Weight-driven methods (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"loftq"``) are computed
from the base weight shards instead, in :mod:`dist_lora.init`; :func:`weight_method` names them.
"""

from __future__ import annotations

import hashlib
import math
import re
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
# Computed from the base weight shards: name -> module of dist_lora.init with ``factors(...)``.
# "pissa_niter_K" is "pissa" with K subspace iterations (randomised SVD).
WEIGHT_METHODS = {"pissa": "dist_lora.init.pissa", "olora": "dist_lora.init.olora", "loftq": "dist_lora.init.loftq"}
_NITER = re.compile(r"^pissa_niter_(.*)$")


def weight_method(value) -> tuple[str, int | None] | None:
    """``(name, niter)`` of a weight-driven method (``niter`` only for ``pissa_niter_K``), or
    ``None`` for a seeded method. Raises ``ValueError`` for a malformed ``pissa_niter_K``."""
    if not isinstance(value, str):
        return None
    match = _NITER.match(value)
    if match:
        if not re.fullmatch(r"[0-9]+", match.group(1)):
            raise ValueError(f"init_lora_weights={value!r}: the number of subspace iterations after "
                             f"'pissa_niter_' must be a non-negative integer, e.g. 'pissa_niter_4'")
        return "pissa", int(match.group(1))
    if value.lower() == "olora":
        return "olora", None
    return (value, None) if value in WEIGHT_METHODS else None


def check_init_method(value) -> None:
    if weight_method(value) is not None:
        return
    if value not in INIT_METHODS or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        known = ", ".join([repr(k) for k in INIT_METHODS] + [repr(k) for k in WEIGHT_METHODS] + ["'pissa_niter_K'"])
        raise ValueError(f"init_lora_weights={value!r} is not a known initialisation; known: {known}")


def seeded_generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``names`` (adapter, module, slot): equal on every rank."""
    digest = hashlib.sha256("/".join((str(seed),) + names).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def initial_factors(method, shapes: dict, kind: str, r: int, seed: int, *names: str) -> dict:
    """Global initial tensors of one adapter slot; the generator is seeded from ``seed`` and
    ``names`` (adapter, module, slot), so every rank draws the same numbers. A weight-driven
    method starts from ``True`` here; :mod:`dist_lora.init` then overwrites A and B."""
    check_init_method(method)
    method = True if weight_method(method) is not None else method
    return INIT_METHODS[method](shapes, kind, r, seeded_generator(seed, *names))
