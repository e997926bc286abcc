"""EVA's rank redistribution (a pure function, identical on every rank).

The budget is the sum of the layers' configured ranks. Every (layer, component) pair competes
with its explained-variance ratio; the ``budget`` largest win and each layer's count is its new
rank, capped at ``round(r * rho)`` by the number of components it offers. Layers that share
their input (q/k/v, gate/up) offer the same values; the one that carries the SVD keeps the
largest count of its group. The order of the candidates, and so the order among equal values,
is PEFT's: layers that carry an SVD in model order, then the layers that share it.
"""

from __future__ import annotations

from collections import Counter

import torch


def layer_order(names: list[str], leader: dict[str, str]) -> dict[str, str]:
    """PEFT's ``layer_hook_map``: leaders (mapping to themselves) then followers -> leader."""
    leaders = [n for n in names if leader[n] == n]
    followers = [n for lead in leaders for n in names if leader[n] == lead and n != lead]
    return {**{n: n for n in leaders}, **{n: leader[n] for n in followers}}


def rank_distribution(ratios: dict[str, torch.Tensor], hook_map: dict[str, str], budget: int,
                      max_components: dict[str, int]) -> dict[str, int]:
    """New rank per layer. ``ratios[leader]``: explained-variance ratios (descending) of the
    leader's PCA; ``hook_map``: layer -> leader in PEFT's order (:func:`layer_order`)."""
    keys, values = [], []
    for name, lead in hook_map.items():
        for value in ratios[lead][: max_components[lead]]:
            keys.append(name)
            values.append(value)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    counts = {name: counts.get(name, 0) for name in hook_map}
    for name, lead in hook_map.items():
        if name != lead and counts[lead] < counts[name]:
            counts[lead], counts[name] = counts[name], counts[lead]
    return counts
