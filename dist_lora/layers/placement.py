"""Adding adapter outputs into their slots of a base output, in place, with nothing at full width.

``into_slots(out, entries)`` takes the base layer's fresh local output ``out`` [..., local_out]
(without its bias; for a row-parallel layer, this rank's partial sum before the reduction) and
applies each :class:`Entry` in order to the slot's strided view ``V`` of ``out``
(:meth:`dist_lora.layers.slots.Slot.view`), in place:

* a product entry (``h`` [.., r], ``lora_b`` [rows, r], scalar ``alpha``, optional ``bias``
  [rows]): ``V <- V + alpha h B^T + bias``; the matmul accumulates straight into ``V`` where it
  is a strided matrix (a whole output or one block per row: ``addmm_``), so the adapter's
  [.., rows] product is never a separate tensor;
* with a DoRA ``scale`` [rows] (``m / ||W + s B A||``): ``V <- scale * (V + alpha h B^T + bias)``;
* a tensor entry (``delta`` [.., rows], or a per-row vector [rows] added to every token):
  ``V <- V + delta``.

Entries are applied in order, so several adapters on one slot compose as PEFT composes them
(each DoRA scale applies to the output so far, PEFT's ``base_result = result``). An adapter in
another dtype than ``out`` (float32 adapters on a bfloat16 base) is computed in its dtype and
rounded into ``out`` once.

Autograd sees one node. Its backward passes the output's gradient through as the base output's
gradient (the same tensor when no slot is scaled; one copy otherwise, whose scaled slots are
multiplied in place), and computes each product entry's ``dL/dh = alpha dV B`` and
``dL/dB = alpha dV^T h`` straight from the slot's view of that gradient. Under torch.compile the
same entries run as ordinary autograd ops on the views (dynamo cannot trace the node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_lora.layers.slots import Slot


@dataclass
class Entry:
    slot: Slot
    h: torch.Tensor | None = None  # product entry: hidden [.., r] ...
    lora_b: torch.Tensor | None = None  # ... times B^T [r, rows] ...
    alpha: float = 1.0  # ... times alpha
    bias: torch.Tensor | None = None  # [rows], added with the product
    scale: torch.Tensor | None = None  # DoRA: [rows]
    delta: torch.Tensor | None = None  # tensor entry: [.., rows] or [rows]


def _leading_dims(view: torch.Tensor, slot: Slot) -> tuple[int, ...]:
    return tuple(range(view.dim() - (1 if slot.block is None else 2)))


def _strided_matrix(view: torch.Tensor, slot: Slot) -> torch.Tensor | None:
    """``view`` as a [tokens, rows] matrix that shares its memory (a whole output, or a block of
    one run of rows per token, whose tokens are evenly strided), else None."""
    if slot.block is not None:
        if slot.block.groups != 1:
            return None
        view = view.squeeze(-2)
    try:
        flat = view.view(-1, view.shape[-1])
    except RuntimeError:
        return None
    return flat


def _as_matrix(view: torch.Tensor, slot: Slot) -> torch.Tensor:
    """``view`` as a [tokens, rows] matrix: a view where possible, else a copy."""
    rows = view.shape[-1] if slot.block is None else view.shape[-1] * view.shape[-2]
    return view.reshape(-1, rows)


def _overlap(a: Slot, b: Slot) -> bool:
    return a.block is None or b.block is None or a.block == b.block


def _disjoint_scales(entries) -> bool:
    """Whether some entry is scaled and no two entries touch the same rows (one adapter per
    projection: each scale then applies to the output's gradient once, independently)."""
    if not any(e.scale is not None for e in entries) or len(entries) == 1:
        return False
    return not any(_overlap(a.slot, b.slot) for i, a in enumerate(entries) for b in entries[i + 1:])


def _full_scale(entries, width: int) -> torch.Tensor:
    """[width] vector: each scaled slot's scale on its rows, 1 elsewhere."""
    scaled = [e for e in entries if e.scale is not None]
    full = torch.ones(width, dtype=scaled[0].scale.dtype, device=scaled[0].scale.device)
    for e in scaled:
        e.slot.view(full).copy_(e.slot.grouped(e.scale.detach()))
    return full


class _IntoSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, entries, *tensors):
        ctx.entries = entries
        saved = []
        for e in entries:
            view = e.slot.view(out)
            if e.delta is not None:
                view.add_(e.slot.grouped(e.delta) if e.delta.dim() == 1 else e.delta.reshape(view.shape))
                continue
            h2 = e.h.flatten(0, -2)  # flatten, not reshape(-1, r): r may be 0 (a shrunk or vacant slot)
            if e.scale is None:
                target = _strided_matrix(view, e.slot)
                if target is not None and target.dtype == h2.dtype:
                    target.addmm_(h2, e.lora_b.t(), alpha=e.alpha)
                else:
                    view.add_(torch.mm(h2, e.lora_b.t()).view(view.shape), alpha=e.alpha)
                if e.bias is not None:
                    view.add_(e.slot.grouped(e.bias))
                continue
            base = _as_matrix(view, e.slot)
            if base.dtype != h2.dtype:
                base = base.to(h2.dtype)
            pre = torch.addmm(base, h2, e.lora_b.t(), alpha=e.alpha)
            if e.bias is not None:
                pre += e.bias
            torch.mul(pre.view(view.shape), e.slot.grouped(e.scale), out=view)
            saved.append(pre)
        ctx.save_for_backward(*saved)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        entries = ctx.entries
        pres = list(ctx.saved_tensors)
        owned = False  # whether ``running`` is our own tensor (writable in place)
        running = grad  # gradient with respect to the output after entry k
        ctx.prescaled = _disjoint_scales(entries)
        if ctx.prescaled:  # every scaled row in one pass: running = grad * [scale; 1 elsewhere]
            running = grad * _full_scale(entries, grad.shape[-1])
            owned = True
        results: list[list] = [None] * len(entries)
        for k in reversed(range(len(entries))):
            e = entries[k]
            grads = []
            if e.scale is not None:
                pre = pres.pop()
                g_view = e.slot.view(grad if ctx.prescaled else running)  # dL/dV after this entry
                g_scale = (g_view * pre.view(g_view.shape)).sum(dim=_leading_dims(g_view, e.slot)).reshape(-1)
                if not ctx.prescaled:
                    scale = e.slot.grouped(e.scale)
                    if not owned and e.slot.block is None:
                        running = running * scale
                    else:
                        if not owned:
                            running = running.clone()
                        e.slot.view(running).mul_(scale)
                    owned = True
            d = e.slot.view(running)
            if e.delta is not None:
                if e.delta.dim() == 1:
                    d = d.sum(dim=_leading_dims(d, e.slot)).reshape(-1)
                else:
                    d = d.reshape(e.delta.shape)
                if any(entries[j].scale is not None and _overlap(entries[j].slot, e.slot) for j in range(k)):
                    d = d.clone()  # an earlier entry scales this region of ``running`` in place below
                results[k] = [d.to(e.delta.dtype)]
                continue
            d2 = _as_matrix(d, e.slot)
            if d2.dtype != e.lora_b.dtype:
                d2 = d2.to(e.lora_b.dtype)
            h2 = e.h.flatten(0, -2)  # flatten, not reshape(-1, r): r may be 0 (a shrunk or vacant slot)
            grads.append(torch.mm(d2, e.lora_b).mul_(e.alpha).view(e.h.shape).to(e.h.dtype))
            grads.append(torch.mm(d2.t(), h2).mul_(e.alpha))
            if e.bias is not None:
                grads.append(d2.sum(0).to(e.bias.dtype))
            if e.scale is not None:
                grads.append(g_scale.to(e.scale.dtype))
            results[k] = grads
        flat = [g for grads in results for g in grads]
        return (running, None, *flat)


def _tensors(e: Entry) -> list[torch.Tensor]:
    if e.delta is not None:
        return [e.delta]
    return [t for t in (e.h, e.lora_b, e.bias, e.scale) if t is not None]


def _traced(out: torch.Tensor, entries: list[Entry]) -> torch.Tensor:
    """The same entries as ordinary autograd ops on the slots' views (under torch.compile: dynamo
    traces them into its graph, where the hand-written node above would break it)."""
    for e in entries:
        view = e.slot.view(out)
        if e.delta is not None:
            view.add_(e.slot.grouped(e.delta) if e.delta.dim() == 1 else e.delta.reshape(view.shape))
            continue
        prod = (torch.matmul(e.h, e.lora_b.t()) * e.alpha).reshape(view.shape)
        if e.bias is not None:
            prod = prod + e.slot.grouped(e.bias)
        if e.scale is None:
            view.add_(prod.to(view.dtype))
        else:
            view.copy_((view.to(prod.dtype) + prod) * e.slot.grouped(e.scale))
    return out


def into_slots(out: torch.Tensor, entries: list[Entry]) -> torch.Tensor:
    """Apply ``entries`` to ``out`` in place (see module docstring); returns ``out``. ``out`` must
    be a fresh tensor that nothing else saved for backward."""
    if not entries:
        return out
    if torch.compiler.is_compiling():
        return _traced(out, entries)
    return _IntoSlots.apply(out, tuple(entries), *[t for e in entries for t in _tensors(e)])
