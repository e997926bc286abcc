"""GGUF (llama.cpp's checkpoint format) -> a Hugging Face safetensors model directory.

The only module that reads GGUF (the ``gguf`` package, optional: ``pip install
'dist-lora[gguf]'``). transformers' GGUF loader dequantises every tensor (Q4_1, Q8_0, ... ->
float) and rebuilds the tokenizer with its chat template from the file's metadata; the result
is saved as ``model.safetensors`` + ``config.json`` + tokenizer files, ready for
``dist_lora.models.from_pretrained`` and for the recipes. The directory appears whole or not at
all (:mod:`dist_lora.checkpoint.atomic`). Architectures outside the model families dist_lora
trains are refused before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_lora.checkpoint.atomic import atomic_directory
from dist_lora.models.families import FAMILIES

INSTALL_HINT = "install it with: pip install 'dist-lora[gguf]' (the gguf package)"
ARCHITECTURE_FIELD = "general.architecture"


def supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` values this converter maps (= dist_lora's model types)."""
    return [name for family in FAMILIES for name in family.model_types]


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file (its header only is read)."""
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(f"reading GGUF needs the gguf package, which is not installed; {INSTALL_HINT}") from exc
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from None
    field = reader.fields.get(ARCHITECTURE_FIELD)
    if field is None:
        raise ValueError(f"{path}: GGUF field {ARCHITECTURE_FIELD} is missing; not a model checkpoint")
    return str(field.contents())


def convert_gguf(path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the GGUF checkpoint ``path`` as a Hugging Face directory ``out`` (weights in ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    architecture = gguf_architecture(path)
    supported = supported_architectures()
    if architecture not in supported:
        raise ValueError(f"{path}: GGUF field {ARCHITECTURE_FIELD} is {architecture!r}, which convert-gguf cannot "
                         f"map; supported: {', '.join(supported)} (the model families dist_lora trains)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model.hf_quantizer = None  # the weights are dequantised now: save them as plain tensors
        model.config.quantization_config = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
