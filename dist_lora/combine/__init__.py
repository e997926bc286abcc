"""Combining adapters into a new one (PEFT's ``add_weighted_adapter``), on sharded models:
argument checks and plan (``checks``), task-arithmetic merges on shards (``task_arithmetic``),
distributed order statistics (``order_stats``), the combination itself (``weighted``)."""
