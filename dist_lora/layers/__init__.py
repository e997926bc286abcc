"""Adapter layers, one concern per file: LoRA / DoRA on column-, row-parallel and plain linear
layers (``linear``, ``dora``) and on embeddings (``embedding``), the shared wrapper
(``adapter_layer``, ``wrapper``), factors and their sharding (``factors``, ``sharding``,
``slots``), ``modules_to_save``, the 4-bit base layer (``quantized``) and the base-type dispatch
table (``dispatch``)."""
