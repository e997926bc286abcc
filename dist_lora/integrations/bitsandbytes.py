"""The one seam to bitsandbytes (optional: ``pip install 'dist-lora[quant]'``).

Only 4-bit blockwise quantisation is used (nf4 or fp4, as QLoRA and LoftQ define it). A weight
is quantised row-major in blocks of ``blocksize`` elements with one absmax per block; when a
TP shard's row length is a multiple of ``blocksize``, quantising each shard gives exactly the
blocks of the global weight, so sharded quantisation equals unsharded quantisation.
``compress_statistics`` (double quantisation of the absmax) is off: it would couple blocks
across shards.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

INSTALL_HINT = "install it with: pip install 'dist-lora[quant]' (bitsandbytes>=0.45)"


def available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _functional(feature: str):
    try:
        import bitsandbytes.functional as functional
    except ImportError as exc:
        raise ImportError(f"{feature} needs bitsandbytes, which is not installed; {INSTALL_HINT}") from exc
    return functional


@dataclass
class Quantized4bit:
    """A 4-bit weight as plain tensors: ``packed`` uint8 [numel / 2, 1] (two codes per byte) and
    ``absmax`` float32 [numel / blocksize], plus what is needed to decode them."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int

    def dequantize(self) -> torch.Tensor:
        """The dequantised weight [shape], in the dtype it was quantised from."""
        return dequantize_4bit(self.packed, self.absmax, self.shape, self.dtype, self.quant_type, self.blocksize)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                    quant_type: str, blocksize: int) -> torch.Tensor:
    """Decode a weight stored as :class:`Quantized4bit` tensors (e.g. module buffers)."""
    functional = _functional("4-bit dequantisation")
    state = functional.QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                                  code=functional.get_4bit_type(quant_type, device=packed.device),
                                  quant_type=quant_type, dtype=torch.float32)
    return functional.dequantize_4bit(packed, state).to(dtype)


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  feature: str = "4-bit quantisation") -> Quantized4bit:
    """Quantise ``weight`` (any float dtype, 2-D) blockwise to 4 bits.

    Raises ``ValueError`` when a row is not a whole number of blocks (then the blocks of a
    shard would straddle rows and differ from the unsharded quantisation)."""
    functional = _functional(feature)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: bitsandbytes 4-bit types are 'nf4' and 'fp4'")
    if weight.dim() != 2 or weight.shape[1] % blocksize:
        raise ValueError(f"{feature}: a weight (shard) of shape {tuple(weight.shape)} has rows that are not a "
                         f"multiple of the block size {blocksize}; pick a blocksize dividing {weight.shape[-1]}")
    packed, state = functional.quantize_4bit(weight.detach().float().contiguous(), blocksize=blocksize,
                                             compress_statistics=False, quant_type=quant_type)
    return Quantized4bit(packed, state.absmax, tuple(weight.shape), weight.dtype, quant_type, blocksize)
