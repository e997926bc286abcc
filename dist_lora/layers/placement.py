"""Adding adapter outputs into their slots of a base output, in place, with nothing at full width.

``into_slots(out, entries)`` takes the base layer's fresh local output ``out`` [..., local_out]
(without its bias; for a row-parallel layer, this rank's partial sum before the reduction) and,
for each ``(slot, delta, scale)`` in order, updates the slot's strided view ``V`` of ``out``
(:meth:`dist_lora.layers.slots.Slot.view`) in place:

* ``scale is None`` (LoRA, or a DoRA term already complete):  ``V <- V + delta``
* ``scale`` given (DoRA with the base output reused):          ``V <- scale * (V + delta)``

``delta`` [..., rows] (or a per-row vector [rows], added to every token) is the slot's adapter output (``s (x A^T) B^T``, any dtype: it is cast to
``out``'s dtype once, as it is written); ``scale`` [rows] is DoRA's ``m / ||W + s B A||``.
Entries are applied in order, so several adapters on one slot compose as PEFT composes them
(each DoRA scale applies to the output so far, PEFT's ``base_result = result``).

Autograd sees one node. Its backward passes the output's gradient through as the base output's
gradient (the same tensor when no slot is scaled; one copy otherwise, whose scaled slots are
multiplied in place), and gives each ``delta`` the gradient of its slot (a view of the output's
gradient, or the scaled one) and each ``scale`` ``sum_tokens(dV * (V + delta))``.
"""

from __future__ import annotations

import torch

from dist_lora.layers.slots import Slot


def _leading_dims(view: torch.Tensor, slot: Slot) -> tuple[int, ...]:
    return tuple(range(view.dim() - (1 if slot.block is None else 2)))


def _overlap(a: Slot, b: Slot) -> bool:
    return a.block is None or b.block is None or a.block == b.block


class _IntoSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, slots, scaled, *tensors):
        ctx.slots, ctx.scaled, ctx.meta = slots, scaled, []
        saved, it = [], iter(tensors)
        for slot, has_scale in zip(slots, scaled):
            delta = next(it)
            view = slot.view(out)
            # a per-row vector [rows] (a bias) broadcasts over the tokens
            d = slot.grouped(delta) if delta.dim() == 1 else delta.reshape(view.shape)
            ctx.meta.append((delta.dtype, delta.shape))
            if not has_scale:
                view.add_(d)
                continue
            scale = slot.grouped(next(it))
            pre = view + d
            torch.mul(pre, scale, out=view)
            saved += [pre, scale]
        ctx.save_for_backward(*saved)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        slots, scaled = ctx.slots, ctx.scaled
        pairs = iter(reversed(ctx.saved_tensors))
        owned = False  # whether ``running`` is our own tensor (writable in place)
        running = grad  # gradient with respect to the output after entry k
        grads: list = [None] * len(slots)
        for k in reversed(range(len(slots))):
            slot, (dtype, shape) = slots[k], ctx.meta[k]
            g_scale = None
            if scaled[k]:
                scale, pre = next(pairs), next(pairs)
                g_view = slot.view(running)
                g_scale = (g_view * pre).sum(dim=_leading_dims(g_view, slot)).reshape(-1).to(scale.dtype)
                if not owned and slot.block is None:
                    running = running * scale
                else:
                    if not owned:
                        running = running.clone()
                    slot.view(running).mul_(scale)
                owned = True
            d = slot.view(running)
            if len(shape) == 1:
                d = d.sum(dim=_leading_dims(d, slot)).reshape(-1)
            else:
                d = d.reshape(shape)
            if any(scaled[j] and _overlap(slots[j], slot) for j in range(k)):
                d = d.clone()  # an earlier entry scales this region of ``running`` in place below
            grads[k] = (d.to(dtype), g_scale)
        flat = []
        for (d, g_scale), has_scale in zip(grads, scaled):
            flat.append(d)
            if has_scale:
                flat.append(g_scale)
        return (running, None, None, *flat)


def into_slots(out: torch.Tensor, entries: list[tuple[Slot, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Apply ``entries`` = ``[(slot, delta, scale or None), ...]`` to ``out`` in place (see module
    docstring); returns ``out``. ``out`` must be a fresh tensor that nothing else saved."""
    if not entries:
        return out
    slots = tuple(slot for slot, _, _ in entries)
    scaled = tuple(scale is not None for _, _, scale in entries)
    tensors = []
    for _, delta, scale in entries:
        tensors.append(delta)
        if scale is not None:
            tensors.append(scale)
    return _IntoSlots.apply(out, slots, scaled, *tensors)
