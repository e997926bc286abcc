"""EVA (Explained Variance Adaptation) initialisation on sharded models: PEFT's API and results,
computed from tensor-, sequence- and data-parallel shards with compact sketches: the sharded
incremental PCA (``svd``), layer-input hooks (``hooks``), rank redistribution (``ranks``),
``get_eva_state_dict`` (``collect``) and ``initialize_lora_eva_weights`` (``initialize``).
Its config is :class:`dist_lora.config.EvaConfig`; the public names are exported by :mod:`dist_lora`."""
