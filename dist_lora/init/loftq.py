"""LoftQ (Li et al., 2023, https://arxiv.org/abs/2310.08659) on a TP-sharded weight.

PEFT's ``loftq_init`` (``peft.utils.loftq_utils``) on the global ``W`` [m, n], float32, for
``loftq_iter`` rounds: quantise the residual target to nf4 (bitsandbytes ``Params4bit``:
blocks of 64, ``compress_statistics=False``), ``D = dequant``, take the rank-``r`` SVD of
``W - D``: ``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_rᵀ``; the next round quantises ``W - L R``.
Result: ``A = R``, ``B = L`` (PEFT does not divide by ``scaling`` here) and base ``D``.

Sharded: the nf4 blocks run along rows, so quantising each TP shard gives exactly the global
blocks when the local row length is a multiple of 64 (:mod:`dist_lora.integrations.bitsandbytes`);
the SVD is :func:`dist_lora.parallel.linalg.svd` of the sharded residual. Only 4 bits: PEFT's 8-bit path
scales each row by its absmax, which a row-parallel shard does not see whole.
"""

from __future__ import annotations

import torch

from dist_lora.integrations import bitsandbytes as bnb
from dist_lora.parallel import linalg

BLOCKSIZE = 64  # bitsandbytes Params4bit's default, which PEFT's loftq_init uses


def check_loftq(config, hf_name: str, local_in: int) -> None:
    """Raise ``ValueError`` if LoftQ cannot run on this layer (``LoraConfig`` checked loftq_config)."""
    if not bnb.available():
        raise ValueError(f"init_lora_weights='loftq' needs bitsandbytes, which is not installed; {bnb.INSTALL_HINT}")
    if local_in % BLOCKSIZE:
        raise ValueError(f"init_lora_weights='loftq': {hf_name} has {local_in} input features per tensor-parallel "
                         f"rank, not a multiple of the nf4 block size {BLOCKSIZE}, so sharded quantisation would "
                         f"differ from the unsharded one; use a smaller tensor-parallel size or leave it out")


def factors(weight, r: int, scaling: float, niter: int | None, generator: torch.Generator, config):
    """Local ``(lora_A, lora_B, dequantised base shard)`` (float32) of ``weight``."""
    w = weight.local
    iterations = int(config.loftq_config.get("loftq_iter", 1))
    target = w
    for i in range(iterations):
        dequant = bnb.quantize_4bit(target, "nf4", BLOCKSIZE, feature="LoftQ").dequantize().float()
        u, s, vh = linalg.svd(w - dequant, weight.dim, weight.group, r)
        root = s.sqrt()
        low, high = u * root, root.unsqueeze(1) * vh  # L [m, r], R [r, n]
        if i + 1 < iterations:
            target = w - low @ high
    return high, low, dequant
