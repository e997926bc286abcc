"""The auxiliary load-balancing loss of mixture-of-experts families, as transformers defines it.

Mixtral and Qwen3-MoE add ``router_aux_loss_coef * aux`` to the language-model loss when their
config has ``output_router_logits=True`` (transformers' ``load_balancing_loss_func``, Switch
Transformer eqs. 4-6, https://arxiv.org/abs/2101.03961). Over the ``N = L * T`` (layer, token)
pairs of one forward pass (``L`` MoE layers, ``T`` tokens):

    aux = E * sum_e (C_e / N) * (P_e / N)

with ``C_e`` the number of top-k assignments to expert ``e`` and ``P_e`` the sum of its softmax
router probabilities (over all E experts), both pooled over every layer (not averaged per
layer). ``C`` is a count (no gradient); ``P`` carries the gradient into the router inputs, and so
into the adapters below every MoE layer (the router itself is frozen).

Sharded: under sequence parallelism each TP rank routes its own tokens, so ``C``, ``P`` and
``T`` are summed over TP (``P`` with ``reduce_from_group``: every TP rank holds the same loss,
and the gradient reaches each rank's own tokens once). A data-parallel replica's loss is that of
its own batch, as a single device computes it for that batch. Expert parallelism changes
nothing here: routing happens before the tokens leave their rank. With pipeline parallelism the
layers' statistics live on different stages and would have to meet before any stage's backward;
that is not supported (``forward_backward`` refuses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.integrations.megatron import TopKRouter
from dist_lora.parallel.collectives import all_reduce_, reduce_from_group


class RouterStatistics:
    """Context manager: records every MoE router's counts and probability sums of one forward
    pass of ``model``; :meth:`loss` is then the family's auxiliary loss (see module docstring)."""

    def __init__(self, model: torch.nn.Module, num_experts: int, tp_group):
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.num_experts, self.tp_group = num_experts, tp_group
        self.counts, self.probs, self.tokens, self._hooks = [], [], 0, []

    def _record(self, router, inputs, output) -> None:
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
        logits = F.linear(hidden, router.weight.to(hidden.dtype))  # the router's own logits, again
        self.probs.append(torch.softmax(logits.float(), dim=-1).sum(dim=0))
        self.counts.append(output[1].float().sum(dim=0).detach())  # routing_map [T, E]: the chosen top k
        self.tokens += hidden.shape[0]

    def __enter__(self) -> "RouterStatistics":
        self._hooks = [router.register_forward_hook(self._record) for router in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def loss(self) -> torch.Tensor:
        """``aux`` of the recorded forward pass, equal on every TP rank; collective over TP."""
        if not self.counts:
            raise RuntimeError("no mixture-of-experts router ran in this forward pass")
        counts = all_reduce_(torch.stack(self.counts).sum(dim=0), self.tp_group)
        probs = reduce_from_group(torch.stack(self.probs).sum(dim=0), self.tp_group)
        pairs = all_reduce_(counts.new_tensor(float(self.tokens)), self.tp_group)
        return self.num_experts * torch.sum((counts / pairs) * (probs / pairs))
