"""The DARE mask each rank draws block by block (``local_dare_mask``) is exactly its shard of the
global mask (``dare_mask``, the one the PEFT comparison in ``test_weighted_distributed`` feeds to
PEFT), for row / column, strided (GLU) and vocabulary-padded layouts at TP 2 and 4."""

from __future__ import annotations

import pytest
import torch

from dist_lora.combine.task_arithmetic import DARE_BLOCK_ROWS, Placement, dare_mask, local_dare_mask
from dist_lora.layers.sharding import FactorLayout


def _layouts(shape, tp):
    out = [FactorLayout(dim=0), FactorLayout(dim=1), FactorLayout(dim=0, stride=2),
           FactorLayout(dim=1, size=shape[1], padded=shape[1] + (-shape[1]) % tp),
           FactorLayout(dim=0, size=shape[0], padded=shape[0] + (-shape[0]) % tp)]
    return [lay for lay in out if lay.padded is not None or shape[lay.dim] % (tp * lay.stride) == 0]


@pytest.mark.parametrize("shape", [(2 * DARE_BLOCK_ROWS + 88, 36), (36, 2 * DARE_BLOCK_ROWS + 88), (101, 8)])
@pytest.mark.parametrize("tp", [2, 4])
def test_local_mask_is_the_shard_of_the_global_mask(shape, tp):
    full = dare_mask(shape, 0.4, 3, "adapter", "module", "lora_A", "0")
    assert abs(full.mean().item() - 0.4) < 0.05
    for layout in _layouts(shape, tp):
        for rank in range(tp):
            local = local_dare_mask(Placement(layout, shape, None, tp, rank), 0.4, 3, "adapter", "module", "lora_A", "0")
            assert torch.equal(local, layout.local(full, tp, rank)), (layout, rank)


def test_masks_differ_by_name_and_seed():
    base = dare_mask((16, 16), 0.5, 3, "a", "m", "lora_A", "0")
    assert not torch.equal(base, dare_mask((16, 16), 0.5, 3, "a", "m", "lora_A", "1"))
    assert not torch.equal(base, dare_mask((16, 16), 0.5, 4, "a", "m", "lora_A", "0"))
    assert torch.equal(base, dare_mask((16, 16), 0.5, 3, "a", "m", "lora_A", "0"))
