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
nothing here: routing happens before the tokens leave their rank.

Pipeline parallelism: the layers' statistics live on different stages, and a stage's backward
needs the counts ``C`` of every layer. ``C`` carries no gradient, so ``aux`` is linear in the
probability sums once ``C`` is known: ``aux = (E / N^2) * sum_e C_e * sum_l P^l_e``. A
forward-only pass through the pipeline first records each micro-batch's ``C``, ``P`` and token
count (:class:`MicroBatchRouting`), summed over TP and PP: that gives the value of ``aux``
exactly. The training pass then adds, at every router ``l``, the local term
``(E / N^2) * sum_e C_e * P^l_e`` to the backward (:class:`RouterLossGradients`), so each stage
back-propagates its own layers' share of the gradient. The routing of both passes is the same
(same weights, same tokens); the cost is one extra forward pass per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_lora.integrations.megatron import TopKRouter
from dist_lora.parallel.collectives import all_reduce_, reduce_from_group


def _probability_sums(router, inputs) -> tuple[torch.Tensor, int]:
    """(P [E]: the softmax router probabilities summed over this rank's tokens, with gradient
    into the router input; the number of tokens)."""
    hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
    logits = F.linear(hidden, router.weight.to(hidden.dtype))  # the router's own logits, again
    return torch.softmax(logits.float(), dim=-1).sum(dim=0), hidden.shape[0]


def _counts(output) -> torch.Tensor:
    """C [E] of one router call: its routing_map [T, E] marks the chosen top k of each token."""
    return output[1].float().sum(dim=0).detach()


def _routers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class _RouterHooks:
    """A context that calls ``self._record(router, inputs, output)`` after every forward of the
    routers in ``self.routers`` while it is open."""

    routers: list
    _hooks: list

    def __enter__(self):
        self._hooks = [router.register_forward_hook(self._record) for router in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, router, inputs, output) -> None:
        raise NotImplementedError


class RouterStatistics(_RouterHooks):
    """Context manager: records every MoE router's counts and probability sums of one forward
    pass of ``model``; :meth:`loss` is then the family's auxiliary loss (see module docstring)."""

    def __init__(self, model: torch.nn.Module, num_experts: int, tp_group):
        self.routers = _routers(model)
        self.num_experts, self.tp_group = num_experts, tp_group
        self.counts, self.probs, self.tokens, self._hooks = [], [], 0, []

    def _record(self, router, inputs, output) -> None:
        probs, tokens = _probability_sums(router, inputs)
        self.probs.append(probs)
        self.counts.append(_counts(output))
        self.tokens += tokens

    def loss(self) -> torch.Tensor:
        """``aux`` of the recorded forward pass, equal on every TP rank; collective over TP."""
        if not self.counts:
            raise RuntimeError("no mixture-of-experts router ran in this forward pass")
        counts = all_reduce_(torch.stack(self.counts).sum(dim=0), self.tp_group)
        probs = reduce_from_group(torch.stack(self.probs).sum(dim=0), self.tp_group)
        pairs = all_reduce_(counts.new_tensor(float(self.tokens)), self.tp_group)
        return self.num_experts * torch.sum((counts / pairs) * (probs / pairs))


class MicroBatchRouting(_RouterHooks):
    """Context manager for a forward-only pipeline pass: records, per micro-batch (``micro``,
    set by the caller before each micro-batch's forward), this stage's counts ``C`` [E],
    probability sums ``P`` [E] and (layer, token) pairs. :meth:`pooled` sums them over TP and PP."""

    def __init__(self, model: torch.nn.Module, num_experts: int, num_microbatches: int):
        self.routers, self.micro, self._hooks = _routers(model), 0, []
        device = self.routers[0].weight.device if self.routers else None  # the collectives' device (NCCL)
        self.stats = torch.zeros(num_microbatches, 2 * num_experts + 1, device=device)  # [C | P | pairs]
        self.num_experts = num_experts

    def _record(self, router, inputs, output) -> None:
        probs, tokens = _probability_sums(router, inputs)
        counts = _counts(output)
        self.stats[self.micro] += torch.cat([counts, probs.detach(), counts.new_tensor([float(tokens)])])

    def pooled(self, tp_group, pp_group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collective over TP and PP: (C [M, E], P [M, E], N [M]) of every micro-batch, pooled
        over all layers and sequence shards."""
        stats = all_reduce_(all_reduce_(self.stats.clone(), tp_group), pp_group)
        e = self.num_experts
        return stats[:, :e], stats[:, e:2 * e], stats[:, 2 * e]

    def losses(self, tp_group, pp_group) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective over TP and PP: (``aux`` of each micro-batch [M], its gradient with respect
        to each layer's probability sums, ``E * C / N^2`` [M, E])."""
        counts, probs, pairs = self.pooled(tp_group, pp_group)
        if bool((pairs == 0).any()):
            raise RuntimeError("no mixture-of-experts router ran for some micro-batch")
        pairs = pairs.unsqueeze(-1)
        aux = self.num_experts * torch.sum((counts / pairs) * (probs / pairs), dim=-1)
        return aux, self.num_experts * counts / pairs.pow(2)


class _WithLoss(torch.autograd.Function):
    """Identity on ``x``; its backward also back-propagates ``term`` (a scalar) with gradient
    ``weight``, so that a loss computed on a middle pipeline stage joins that stage's backward."""

    @staticmethod
    def forward(ctx, x, term, weight: float):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full((), ctx.weight), None


class RouterLossGradients:
    """Context manager for the training pass through the pipeline: at every router of this stage,
    the term ``sum_e grads[micro, e] * P^l_e`` (``grads`` from :meth:`MicroBatchRouting.losses`)
    is attached to the router's top-k probabilities with weight ``weight`` (the coefficient over
    the number of micro-batches); ``micro`` is set by the caller before each forward."""

    def __init__(self, model: torch.nn.Module, grads: torch.Tensor, weight: float):
        self.routers, self.grads, self.weight, self.micro, self._hooks = _routers(model), grads, weight, 0, []

    def _attach(self, router, inputs, output):
        probs, _ = _probability_sums(router, inputs)
        term = torch.sum(self.grads[self.micro].to(probs.device) * probs)
        return (_WithLoss.apply(output[0], term, self.weight), *output[1:])

    def __enter__(self) -> "RouterLossGradients":
        self._hooks = [router.register_forward_hook(self._attach) for router in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
