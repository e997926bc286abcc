"""Weight-driven initialisation (PiSSA, OLoRA, LoftQ) computed on the *global* weight from
local shards with small collectives over the TP group; no rank ever holds the full weight.

Each method module exposes ``factors(weight, r, scaling, niter, generator, config)`` returning
this rank's ``lora_A``, ``lora_B`` and new base-weight shard; :mod:`dist_lora.init.weight`
reads the shard, dispatches through :data:`dist_lora.init_methods.WEIGHT_METHODS` and writes.
"""

from dist_lora.init.weight import ShardedWeight, check_weight_init, initialise_from_weight

__all__ = ["ShardedWeight", "check_weight_init", "initialise_from_weight"]
