"""Combining adapters into a new one (PEFT's ``add_weighted_adapter``), on sharded models."""

from dist_lora.combine.weighted import add_weighted_adapter

__all__ = ["add_weighted_adapter"]
