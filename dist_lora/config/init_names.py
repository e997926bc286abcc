"""The values ``init_lora_weights`` may take, and how a value is read (pure Python).

Seeded methods draw the factors from a generator (``True``, ``False``, ``"gaussian"``, and
``"eva"`` until EVA sets ``lora_A`` from data); weight-driven methods compute them from the base
weight (``"pissa"``, ``"pissa_niter_K"`` = PiSSA with K subspace iterations, ``"olora"``,
``"loftq"``). This module only names them; :mod:`dist_lora.init.methods` is the one table that
maps each name to its implementation.
"""

from __future__ import annotations

import re

SEEDED = (True, False, "gaussian", "eva")
WEIGHT_DRIVEN = ("pissa", "olora", "loftq")
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
    return (value, None) if value in WEIGHT_DRIVEN else None


def check_init_method(value) -> None:
    """Raise ``ValueError`` unless ``value`` names an initialisation."""
    if weight_method(value) is not None:
        return
    if value not in SEEDED or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        known = ", ".join([repr(k) for k in SEEDED + WEIGHT_DRIVEN] + ["'pissa_niter_K'"])
        raise ValueError(f"init_lora_weights={value!r} is not a known initialisation; known: {known}")
