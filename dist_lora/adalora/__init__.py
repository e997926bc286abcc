"""AdaLoRA (https://openreview.net/forum?id=lq62uWRJjiY) on any TP / SP / PP / DP layout, as PEFT
does it on one device: SVD-form adapters (``factors``), the one path of adding them (``apply``),
orthogonality penalty (``orth``), one global rank budget (``allocator``), shrinking (``shrink``),
training state (``state``) and PEFT exports (``export``). The public names are exported by
:mod:`dist_lora`; its config is :class:`dist_lora.config.AdaLoraConfig`."""
