"""Which decoder layers each pipeline stage holds: even, balanced, or set by the user.

Megatron-Core gives the first and the last pipeline stage their own layer counts
(``TransformerConfig.num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``,
the same fields and rule in megatron-core 0.16.1 and 0.19.2) and splits the remaining layers
evenly over the middle stages. dist_lora uses exactly that mechanism, so every stage -> layer map here is one
Megatron can build:

* nothing set and PP divides the layers: every stage holds ``L / PP`` layers;
* nothing set and PP does not divide them (**balanced**, chosen automatically): the largest stage is
  as small as it can be. The middle stages hold ``ceil(L / PP)`` layers, or fewer where that leaves
  the first or last stage empty; the first and last stages share the rest, the first stage holding
  the odd one. E.g. 3 layers on PP=2: ``[2, 1]``; 5: ``[3, 2]``; Qwen2.5-7B's 28 on PP=8:
  ``[2, 4 x 6, 2]``; SmolLM2's 30 on PP=8: ``[3, 4 x 6, 3]``; Llama-3.1-405B's 126 on PP=16:
  ``[7, 8 x 14, 7]``;
* ``first_stage_layers`` and / or ``last_stage_layers`` set: those stages hold that many, the
  other stages split the rest evenly (Megatron's rule; the rest must divide evenly and leave no
  stage empty).

Every walk over layers (loading, saving, adapter candidates, checkpoints and offline resharding,
PEFT import / export, EVA, AdaLoRA, merges) asks :meth:`dist_lora.models.spec.ModelSpec.layers_of_stage`,
which is :func:`stage_sizes` of the model's choice.
"""

from __future__ import annotations

import math


def _valid_firsts(num_layers: int, pp: int, last: int | None) -> list[int]:
    rest_stages = pp - 1 - (last is not None)
    out = []
    for first in range(1, num_layers + 1):
        rest = num_layers - first - (last or 0)
        if rest_stages == 0 and rest == 0 or rest_stages > 0 and rest >= rest_stages and rest % rest_stages == 0:
            out.append(first)
    return out


def _choices(values: list[int]) -> str:
    if not values:
        return "none"
    if len(values) > 8:
        return f"{', '.join(map(str, values[:4]))}, ..., {', '.join(map(str, values[-2:]))}"
    return ", ".join(map(str, values))


def balanced(num_layers: int, pp: int) -> tuple[int, int] | None:
    """``(first, last)`` stage layer counts that minimise the largest stage; ``None`` when PP divides."""
    if num_layers % pp == 0:
        return None
    if pp == 2:
        return math.ceil(num_layers / 2), num_layers // 2
    best = None
    for middle in range(1, num_layers // (pp - 2) + 1):
        rest = num_layers - (pp - 2) * middle
        if rest < 2:
            break
        first = math.ceil(rest / 2)
        key = (max(middle, first), first)  # smallest largest stage, then light first / last stages
        if best is None or key < best[0]:
            best = (key, (first, rest - first))
    return best[1]


def stage_sizes(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> tuple[int, ...]:
    """Layer count of every pipeline stage (see module docstring); ``ValueError`` names a bad setting."""
    if pp < 1:
        raise ValueError(f"pipeline_parallel={pp} must be >= 1")
    if pp > num_layers:
        raise ValueError(
            f"pipeline_parallel={pp} is larger than the number of layers ({num_layers}); "
            f"use pipeline_parallel <= {num_layers}"
        )
    if pp == 1:
        if first is not None or last is not None:
            raise ValueError(
                "first_stage_layers / last_stage_layers need pipeline_parallel > 1 "
                f"(got pipeline_parallel=1, first_stage_layers={first}, last_stage_layers={last})"
            )
        return (num_layers,)
    if first is None and last is None:
        chosen = balanced(num_layers, pp)
        if chosen is None:
            return (num_layers // pp,) * pp
        first, last = chosen
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive number of layers")
    rest_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if (rest_stages == 0 and rest != 0) or (rest_stages > 0 and (rest < rest_stages or rest % rest_stages)):
        raise ValueError(_layout_error(num_layers, pp, first, last, rest, rest_stages))
    middle = rest // rest_stages if rest_stages else 0
    inner = (middle,) * (pp - 2)
    return (first if first is not None else middle, *inner, last if last is not None else middle)


def _layout_error(num_layers: int, pp: int, first: int | None, last: int | None, rest: int,
                  rest_stages: int) -> str:
    if first is not None:
        setting, value, valid = "first_stage_layers", first, _valid_firsts(num_layers, pp, last)
        given = f" with last_stage_layers={last}" if last is not None else ""
    else:  # the rule is symmetric: the valid last-stage counts are the valid first-stage ones
        setting, value, valid, given = "last_stage_layers", last, _valid_firsts(num_layers, pp, None), ""
    if rest_stages == 0:
        what = f"and last_stage_layers={last} add up to {first + last} of the {num_layers} layers"
    else:
        what = f"leaves {rest} layer(s) for {rest_stages} other stage(s)"
    return (f"{setting}={value} {what} on pipeline_parallel={pp} (every stage needs at least one layer, "
            f"the stages between the first and the last the same number); valid {setting} values here{given}: "
            f"{_choices(valid)}")


def stage_range(sizes: tuple[int, ...], pp_rank: int) -> range:
    """Global layer indices of stage ``pp_rank``."""
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def megatron_uneven_counts(sizes: tuple[int, ...]) -> tuple[int | None, int | None]:
    """``(num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage)`` for Megatron:
    ``(None, None)`` when every stage holds the same number of layers."""
    if len(set(sizes)) <= 1:
        return None, None
    return sizes[0], sizes[-1]
