"""Pipeline stage maps: even, balanced and user-set ones, and Megatron-Core building the same."""

import pytest
import torch

from dist_lora.models.pipeline_layout import balanced, megatron_uneven_counts, stage_range, stage_sizes
from dist_lora.models.spec import spec_from_config
from dist_lora.testing.tiny import TINY_CONFIGS


@pytest.mark.parametrize("layers,pp,expected", [
    (4, 2, (2, 2)),
    (3, 2, (2, 1)),
    (5, 2, (3, 2)),
    (5, 4, (2, 1, 1, 1)),
    (10, 4, (2, 3, 3, 2)),
    (28, 8, (2, 4, 4, 4, 4, 4, 4, 2)),  # Qwen2.5-7B: middle stages of ceil(28 / 8) = 4
    (30, 8, (3, 4, 4, 4, 4, 4, 4, 3)),  # SmolLM2-135M
    (126, 16, (7,) + (8,) * 14 + (7,)),  # Llama-3.1-405B
])
def test_balanced_stages_are_as_small_as_megatron_allows(layers, pp, expected):
    sizes = stage_sizes(layers, pp)
    assert sizes == expected and sum(sizes) == layers and min(sizes) >= 1
    assert max(sizes) == _smallest_largest_stage(layers, pp)


def _smallest_largest_stage(layers: int, pp: int) -> int:
    """Over every map Megatron can build (first, equal middle stages, last; each >= 1 layer)."""
    if pp == 2:
        return min(max(f, layers - f) for f in range(1, layers))
    return min(max(f, m, layers - f - (pp - 2) * m) for m in range(1, layers) for f in range(1, layers)
               if layers - f - (pp - 2) * m >= 1)


@pytest.mark.parametrize("layers,pp,first,last,expected", [
    (5, 2, 1, None, (1, 4)),
    (5, 2, None, 1, (4, 1)),
    (5, 2, 2, 3, (2, 3)),
    (10, 4, 1, None, (1, 3, 3, 3)),
    (10, 4, None, 4, (2, 2, 2, 4)),
    (10, 4, 2, 2, (2, 3, 3, 2)),
    (8, 4, 2, None, (2, 2, 2, 2)),  # the even map, spelled out
])
def test_first_and_last_stage_counts_split_the_rest_evenly(layers, pp, first, last, expected):
    assert stage_sizes(layers, pp, first, last) == expected


@pytest.mark.parametrize("layers,pp,first,last", [
    (4, 2, None, None), (3, 2, None, None), (5, 2, None, None), (5, 2, 1, None), (10, 4, None, None),
    (10, 4, 1, None), (10, 4, None, 4), (10, 4, 2, 2), (30, 8, None, None), (7, 3, None, None),
])
def test_megatron_builds_the_same_stage_map(layers, pp, first, last):
    """Megatron-Core's own layer offset and layer count per stage, from the first / last counts
    dist_lora gives its config, equal ``stage_range`` on every stage."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    sizes = stage_sizes(layers, pp, first, last)
    f, l = megatron_uneven_counts(sizes)
    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                               pipeline_model_parallel_size=pp, num_layers_in_first_pipeline_stage=f,
                               num_layers_in_last_pipeline_stage=l, pipeline_dtype=torch.float32)
    for rank in range(pp):
        ours = stage_range(sizes, rank)
        assert get_transformer_layer_offset(config, pp_rank=rank) == ours.start, (rank, sizes)
        assert get_num_layers_to_build(config, pp_rank=rank) == len(ours), (rank, sizes)


def test_even_maps_leave_megatron_defaults():
    assert megatron_uneven_counts(stage_sizes(8, 4)) == (None, None)
    assert balanced(8, 4) is None


@pytest.mark.parametrize("layers,pp,first,last,needles", [
    (2, 4, None, None, ("pipeline_parallel=4 is larger than the number of layers (2)",
                        "use pipeline_parallel <= 2")),
    (3, 2, 3, None, ("first_stage_layers=3 leaves 0 layer(s) for 1 other stage(s)",
                     "valid first_stage_layers values here: 1, 2")),
    (10, 4, 2, None, ("first_stage_layers=2 leaves 8 layer(s) for 3 other stage(s)",
                      "valid first_stage_layers values here: 1, 4, 7")),
    (10, 4, None, 9, ("last_stage_layers=9", "valid last_stage_layers values here: 1, 4, 7")),
    (5, 2, 2, 2, ("first_stage_layers=2 and last_stage_layers=2 add up to 4 of the 5 layers",
                  "valid first_stage_layers values here with last_stage_layers=2: 3")),
    (5, 2, 0, None, ("first_stage_layers=0 must be a positive number of layers",)),
    (5, 1, 2, None, ("first_stage_layers / last_stage_layers need pipeline_parallel > 1",)),
])
def test_layouts_that_cannot_hold_the_model_are_named(layers, pp, first, last, needles):
    with pytest.raises(ValueError) as info:
        stage_sizes(layers, pp, first, last)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_spec_layers_of_stage_and_stage_of_layer_agree():
    spec = spec_from_config(TINY_CONFIGS["llama_5_layers"]).with_pipeline(first_stage_layers=1)
    assert [spec.layers_of_stage(r, 2) for r in range(2)] == [range(0, 1), range(1, 5)]
    assert [spec.stage_of_layer(g, 2) for g in range(5)] == [0, 1, 1, 1, 1]
    auto = spec_from_config(TINY_CONFIGS["llama_5_layers"])
    assert [auto.layers_of_stage(r, 2) for r in range(2)] == [range(0, 3), range(3, 5)]
