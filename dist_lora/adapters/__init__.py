"""Adapters on a model: the model seam (``model``), candidates and target matching
(``candidates``, ``targets``), the one path that adds an adapter with rollback (``add``,
``journal``), LoRA's planner (``lora``), the trainable set (``trainable``), the registry,
management named as in PEFT (``management``), replica checks (``replicas``) and the 4-bit base
(``quantize``). The public names are exported by :mod:`dist_lora`."""
