"""``LoraFactors``: the trainable tensors of one adapter on one slot of one layer (local shards).

============================  ==========================  ====================================
tensor                        global shape                sharded like
============================  ==========================  ====================================
``lora_A``                    [r, in]                     ``BaseShard.a_layout`` (row: on in)
``lora_B``                    [out_slot, r]               ``Slot.b_layout`` (column: on out)
``lora_bias`` (lora_bias)     [out_slot]                  like ``lora_B`` rows
``lora_magnitude_vector``     [out_slot]                  like ``lora_B`` rows (DoRA)
``trained_bias`` (lora_only)  [out_slot]                  like ``lora_B`` rows
============================  ==========================  ====================================

``trained_bias`` (``bias="lora_only"``) is this slot's trainable copy of the base bias rows it
covers; the base bias itself stays frozen, so rows of projections the adapter does not cover
are in no trainable tensor (:mod:`dist_lora.layers.bias`). PEFT names it
``<module>.base_layer.bias``.

For embeddings PEFT names the factors ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B``
[h, r]; they live in the same two attributes here.

**Capacity** (hotswapping, :mod:`dist_lora.adapters.hotswap`): the tensors may have more rank
rows than the adapter they hold, ``capacity >= r``; rows / columns ``r..capacity`` of A / B are
zero, so they add nothing. ``r`` is then the held adapter's rank (what checkpoints and exports
see, through :meth:`LoraFactors.held`), ``r == 0`` a *vacant* slot (a swapped-in adapter that
does not target it: all zero). ``scaling`` is a float, or a 0-dim tensor buffer after
:meth:`LoraFactors.scaling_as_tensor`, so a swap changes its value and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.layers.sharding import BaseShard, FactorLayout
from dist_lora.layers.slots import Slot


class LoraFactors(nn.Module):
    """Local shards of A, B (and lora bias, DoRA magnitude) plus the adapter's scalars, in
    ``dtype`` on ``device`` (the adapted weight's device; :mod:`dist_lora.adapters.precision`)."""

    key_kind: str | None = None  # PEFT key family of the tensors (None: by layer kind; "svd": AdaLoRA)

    def __init__(self, shard: BaseShard, slot: Slot, r: int, alpha: float, scaling: float,
                 dropout: float, lora_bias: bool, use_dora: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.slot, self.r, self.alpha, self.scaling, self.use_dora = slot, r, alpha, scaling, use_dora
        self.a_layout = shard.a_layout
        a_in = self.a_layout.local(torch.empty(0, shard.in_features, device="meta"), shard.tp, shard.rank).shape[1]
        b_rows = slot.b_layout.local(torch.empty(slot.out_features, 0, device="meta"), shard.tp, shard.rank).shape[0]
        self._capacity = r  # kept, not read off lora_A: ZeRO-3 partitions parameters to shape (0,)
        self.lora_A = nn.Parameter(torch.zeros(r, a_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_rows, r, dtype=dtype, device=device))
        self.lora_bias = nn.Parameter(torch.zeros(b_rows, dtype=dtype, device=device)) if lora_bias else None
        self.lora_magnitude_vector = nn.Parameter(torch.ones(b_rows, dtype=dtype, device=device)) if use_dora else None
        self.register_parameter("trained_bias", None)  # see own_bias
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # DoRA: weight norm frozen at merge time, needed to unmerge exactly (as PEFT caches it).
        self.merged_norm: torch.Tensor | None = None
        self.replaced_bias: torch.Tensor | None = None  # base bias rows a merged trained_bias replaced

    def own_bias(self, rows: torch.Tensor) -> None:
        """``bias="lora_only"``: train a copy of the base bias rows this slot covers (``rows``,
        this rank's [rows_local] of the base bias), in the adapter's dtype."""
        self.trained_bias = nn.Parameter(rows.detach().to(self.lora_A.dtype, copy=True))

    def layouts(self) -> dict[str, FactorLayout]:
        """Layout of each tensor attribute that is present."""
        out = {"lora_A": self.a_layout, "lora_B": self.slot.b_layout}
        for name in ("lora_bias", "lora_magnitude_vector", "trained_bias"):
            if getattr(self, name) is not None:
                out[name] = self.slot.b_layout  # [out_slot], split like B's rows
        return out

    def global_shapes(self, shard: BaseShard) -> dict[str, tuple[int, ...]]:
        shapes = {"lora_A": (self.r, shard.in_features), "lora_B": (self.slot.out_features, self.r)}
        for name in ("lora_bias", "lora_magnitude_vector", "trained_bias"):
            if getattr(self, name) is not None:
                shapes[name] = (self.slot.out_features,)
        return shapes

    @torch.no_grad()
    def load_global(self, tensors: dict[str, torch.Tensor], shard: BaseShard) -> None:
        """Copy this rank's shard of each given global tensor into place (shapes checked); rank
        rows beyond ``r`` (hotswap padding) are zeroed."""
        shapes = self.global_shapes(shard)
        layouts = self.layouts()
        for name, full in tensors.items():
            if name not in shapes:
                raise KeyError(f"{name} is not a tensor of this adapter (has {sorted(shapes)})")
            if tuple(full.shape) != shapes[name]:
                raise ValueError(f"{name}: expected global shape {shapes[name]}, got {tuple(full.shape)}")
            target = self.held(name)
            if target is not getattr(self, name):
                getattr(self, name).zero_()
            target.copy_(layouts[name].local(full, shard.tp, shard.rank))

    # -- capacity and scaling (hotswapping) ------------------------------------------------

    @property
    def capacity(self) -> int:
        """Rank of the tensors: ``r``, or the rank they were padded to for hotswapping."""
        return self._capacity

    def set_rank(self, r: int) -> None:
        """The rank tensors were replaced by ones of rank ``r`` (AdaLoRA's shrink): ``r`` and the
        capacity both become ``r``."""
        self.r = self._capacity = r

    @property
    def vacant(self) -> bool:
        """Zero tensors standing in for a module the swapped-in adapter does not target."""
        return self.r == 0

    def held(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The part of ``tensor`` (default: the parameter ``name``, or anything shaped like it,
        e.g. its gradient) that holds the rank-``r`` adapter: ``lora_A[:r]``, ``lora_B[:, :r]``
        (a view), the whole tensor for the other roles or when nothing is padded."""
        tensor = getattr(self, name) if tensor is None else tensor
        if self.r == self.capacity or name not in ("lora_A", "lora_B"):
            return tensor
        return tensor.narrow(0 if name == "lora_A" else 1, 0, self.r)

    @torch.no_grad()
    def pad_rank(self, capacity: int) -> None:
        """Give A and B ``capacity`` rank rows (zeros beyond the current ones): new parameters,
        same values, same ``requires_grad``; the layer's output is unchanged."""
        if capacity < self.capacity:
            raise ValueError(f"cannot pad rank {self.capacity} down to {capacity}")
        for name, dim in (("lora_A", 0), ("lora_B", 1)):
            old = getattr(self, name)
            if old.shape[dim] == capacity:
                continue
            shape = list(old.shape)
            shape[dim] = capacity
            new = old.new_zeros(shape)
            new.narrow(dim, 0, old.shape[dim]).copy_(old)
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            param.__dict__.update(old.__dict__)  # flags other code set on the parameter
            setattr(self, name, param)
        self._capacity = capacity

    def scaling_as_tensor(self) -> None:
        """Hold ``scaling`` as a 0-dim (non-persistent) buffer in the factors' dtype, so changing it
        (:meth:`set_scaling`) changes a tensor's value, not a Python constant torch.compile baked in."""
        if isinstance(self.scaling, torch.Tensor):
            return
        value = self.scaling
        del self.scaling
        self.register_buffer("scaling", torch.tensor(value, dtype=self.lora_A.dtype, device=self.lora_A.device),
                             persistent=False)

    def set_scaling(self, value: float) -> None:
        """Set ``scaling`` in place (a tensor keeps its storage)."""
        if isinstance(self.scaling, torch.Tensor):
            self.scaling.fill_(value)
        else:
            self.scaling = value

    def scale_hidden(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The hidden as ``B`` reads it and the scalar its product is multiplied by, for the hidden
        ``h = x A^T`` [.., r] (a partial sum over TP on row layers): ``(h, s)`` for LoRA, so the
        scaling rides on the ``B`` matmul (its ``alpha``) and no tensor is scaled. A tensor scaling
        (hotswapping) multiplies the narrow hidden instead: ``(h * s, 1)``."""
        if isinstance(self.scaling, torch.Tensor):
            return h * self.scaling.to(h.dtype), 1.0
        return h, self.scaling

    def tp_partial_gradients(self, shard: BaseShard) -> list[nn.Parameter]:
        """Replicated tensors whose gradient each TP rank holds as a *partial sum* after backward
        (``finalize_grads`` sums them over TP, once per step, in buckets).

        Column layers: ``lora_A`` (each rank's ``dL/dh = s dL/dy_i B_i`` covers its output rows
        only). Row layers: ``lora_B``, the DoRA magnitude and ``lora_bias`` (each rank's adapter
        product is computed from its input slice ``x_i A_i^T`` and joins the base's partial sum;
        the bias enters TP rank 0's partial only). Vocab-parallel embeddings: ``lora_B`` (each
        rank's lookup covers the ids it owns)."""
        if shard.tp == 1:
            return []
        names = {"column": ("lora_A",), "embedding": ("lora_B",)}.get(
            shard.kind, ("lora_B", "lora_magnitude_vector", "lora_bias"))
        return [t for t in (getattr(self, n) for n in names) if t is not None]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` on this rank's shard: [rows_local, in_local] (no collective)."""
        return self.scaling * (self.lora_B @ self.lora_A)
