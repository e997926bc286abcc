"""Every initialisation of LoRA factors, by ``init_lora_weights`` value: the one dispatch table.

Seeded methods (:mod:`dist_lora.init.seeded`) return the global tensors of a slot from a
generator equal on every rank. Weight-driven methods compute A, B and the new base shard from the
base weight's TP shards (:mod:`dist_lora.init.weight` reads and writes the shard; each module here
exposes ``factors(weight, r, scaling, niter, generator, config)``). The names accepted by
``LoraConfig`` are those of :mod:`dist_lora.config.init_names`.
"""

from __future__ import annotations

from typing import Callable

from dist_lora.config.init_names import SEEDED as SEEDED_NAMES
from dist_lora.config.init_names import WEIGHT_DRIVEN as WEIGHT_DRIVEN_NAMES
from dist_lora.config.init_names import check_init_method, weight_method
from dist_lora.init import loftq, olora, pissa, seeded

# "eva": as PEFT, the default until dist_lora.eva.initialize_lora_eva_weights sets A from data.
SEEDED: dict[object, Callable] = {True: seeded.default, False: seeded.uniform, "gaussian": seeded.gaussian,
                                  "eva": seeded.default}
# "pissa_niter_K" is "pissa" with K subspace iterations (randomised SVD).
FROM_WEIGHT: dict[str, Callable] = {"pissa": pissa.factors, "olora": olora.factors, "loftq": loftq.factors}
assert set(SEEDED) == set(SEEDED_NAMES) and set(FROM_WEIGHT) == set(WEIGHT_DRIVEN_NAMES)


def initial_factors(method, shapes: dict, kind: str, r: int, seed: int, *names: str) -> dict:
    """Global initial tensors of one adapter slot; the generator is seeded from ``seed`` and
    ``names`` (adapter, module, slot), so every rank draws the same numbers. A weight-driven
    method starts from ``True`` here; :func:`dist_lora.init.weight.initialise_from_weight` then
    overwrites A and B."""
    check_init_method(method)
    method = True if weight_method(method) is not None else method
    return SEEDED[method](shapes, kind, r, seeded.seeded_generator(seed, *names))
