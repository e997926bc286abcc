"""PEFT's weight-driven initialisations as single-device references (PiSSA, OLoRA, LoftQ).

Two things in PEFT 0.21 stop its LoftQ from running on a CPU-only machine, neither of which is
part of the computation: ``loftq_init`` moves the weight to ``"cuda"`` (or ``"xpu"``)
unconditionally, and ``LoraConfig`` refuses ``init_lora_weights="loftq"`` unless ``scipy`` is
importable (a leftover of its removed NF4 fallback). :func:`cpu_loftq` runs PEFT's own
``loftq_init`` bytecode with the device string replaced by ``"cpu"``; :func:`peft_lora_config`
sets ``init_lora_weights="loftq"`` after construction so the scipy guard is skipped.
"""

from __future__ import annotations

import contextlib
import types

import torch


def peft_lora_config(**kwargs):
    """``peft.LoraConfig(**kwargs)``; LoftQ configs bypass PEFT's scipy import guard."""
    import peft

    if kwargs.get("init_lora_weights") != "loftq":
        return peft.LoraConfig(**kwargs)
    loftq = dict(kwargs.pop("loftq_config"))
    config = peft.LoraConfig(**dict(kwargs, init_lora_weights=True))
    config.init_lora_weights, config.loftq_config = "loftq", loftq
    return config


@contextlib.contextmanager
def cpu_loftq():
    """Within the block, PEFT's LoRA layers call ``loftq_init`` computing on the CPU."""
    import peft.tuners.lora.layer as lora_layer
    import peft.utils.loftq_utils as loftq_utils

    original = lora_layer.loftq_init
    fn = loftq_utils.loftq_init.__wrapped__
    consts = tuple("cpu" if c in ("cuda", "xpu") else c for c in fn.__code__.co_consts)
    code = fn.__code__.replace(co_consts=consts)
    lora_layer.loftq_init = torch.no_grad()(types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__))
    try:
        yield
    finally:
        lora_layer.loftq_init = original


def peft_init(hf_model, **config):
    """``peft.get_peft_model`` of ``hf_model`` with the LoRA ``config`` (CPU LoftQ included)."""
    import peft

    with cpu_loftq():
        return peft.get_peft_model(hf_model, peft_lora_config(**config))


def residual_base(peft_model) -> dict[str, torch.Tensor]:
    """The base model's weights (HF names) after PEFT's initialisation rewrote them."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in peft_model.get_base_model().state_dict().items()
            if ".lora_" not in k}
