"""``BaseWrapper``: a module standing in for a base layer it wraps (``self.base_layer``)."""

from __future__ import annotations

from torch import nn


class BaseWrapper(nn.Module):
    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (``weight``, ``config``, ...) come from the base layer, so
        code that reads them (Megatron's tied embeddings, attention) sees the base."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)
