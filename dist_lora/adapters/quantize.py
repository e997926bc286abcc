"""``quantize_base``: QLoRA's 4-bit base weights (the linear layers of the transformer blocks).

The layer is :class:`dist_lora.layers.quantized.QuantizedLinear`; bitsandbytes sits behind
:mod:`dist_lora.integrations.bitsandbytes`. This module walks a model and swaps layers in.

As bitsandbytes' ``load_in_4bit`` does for Hugging Face models, every linear layer is
quantised, adapted or not, except the output layer (``lm_head`` / Megatron's
``output_layer``) and ``modules_to_save`` (trained in full); embeddings and norms stay as they are. On Megatron models each rank
quantises its own TP shard: the result equals quantising the unsharded weight when each shard
row is a whole number of blocks, which holds for every Llama / Mistral / Qwen2 size at TP <= 8
with ``blocksize=64``. Plain ``torch.nn`` models (e.g. Hugging Face models trained under
DeepSpeed) work the same way with TP = 1. Adapters keep their dtype.
"""

from __future__ import annotations

from torch import nn

from dist_lora.adapters.model import view
from dist_lora.integrations import bitsandbytes
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.layers.dispatch import describe
from dist_lora.layers.modules_to_save import ModulesToSave
from dist_lora.layers.quantized import QuantizedLinear
from dist_lora.parallel.agreement import on_every_rank

OUTPUT_LAYERS = ("output_layer", "lm_head")


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, str]]:
    """(name, base layer, owner, attribute) of every linear layer to quantise."""
    out = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(module, ModulesToSave) or (isinstance(module, AdapterLayer) and child_name != "base_layer"):
                continue  # modules_to_save are trained in full; adapter factors stay float
            if isinstance(child, (AdapterLayer, QuantizedLinear)) or full.split(".")[-1] in OUTPUT_LAYERS:
                continue
            if full.endswith(".base_layer") and full.split(".")[-2] in OUTPUT_LAYERS:
                continue
            try:
                wrapper, shard = describe(child)
            except TypeError:
                continue
            if shard.kind in ("column", "row"):
                out.append((full, child, module, child_name))
    return out


def quantize_base(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64) -> list[str]:
    """Replace every linear layer's float weight (this rank's shard) by a frozen 4-bit copy;
    return the names of the layers quantised.

    Apply the adapters first (``apply_lora``: initialisations such as PiSSA read the float
    weight); adapters added later to a quantised layer work too. Collective over all ranks:
    every check runs before any layer is touched and a failure on one rank raises on all of
    them, leaving the model as it was. Merging into a 4-bit base is refused; release with
    ``export_peft`` + ``dist-lora merge`` onto the float base.
    """
    todo = []
    with on_every_rank("quantising the base weights"):
        if not bitsandbytes.available():
            raise ImportError(f"quantize_base needs bitsandbytes, which is not installed; {bitsandbytes.INSTALL_HINT}")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={quant_type!r}: use 'nf4' (QLoRA) or 'fp4'")
        spec = view(model).spec
        if spec is not None and spec.experts is not None:
            raise ValueError(f"quantize_base does not support mixture-of-experts models ({spec.family.name}): a "
                             f"4-bit base for routed experts is not implemented; train on the float base")
        for name, layer, owner, attr in _linear_layers(model):
            if isinstance(owner, AdapterLayer) and owner.merged_adapters:
                raise RuntimeError(f"{name}: adapters {owner.merged_adapters} are merged into the weight; "
                                   f"unmerge them before quantising")
            if layer.weight.shape[-1] % blocksize:
                raise ValueError(f"{name}: this rank's weight shard has rows of {layer.weight.shape[-1]} elements, "
                                 f"not a multiple of blocksize={blocksize}; choose a blocksize dividing it "
                                 f"(bitsandbytes accepts 32, 64, 128, ...)")
            todo.append((name, layer, owner, attr))
        if not todo:
            raise ValueError("quantize_base found no linear layer to quantise (already quantised?)")
    for _, layer, owner, attr in todo:
        setattr(owner, attr, QuantizedLinear(layer, describe(layer)[1], quant_type, blocksize))
    return [name for name, *_ in todo]
