"""Untying the output layer of a tied-embedding Megatron model (``tie_word_embeddings=True``).

A tied model computes its logits with the word embedding's weight: at PP=1 the output layer has
no weight of its own and reads the embedding's; at PP>1 the last stage holds a copy kept equal to
the embedding. Once the output layer's weight is to differ from the embedding (a merged
``modules_to_save`` head, an adapter merged into the head or into the embedding, which the head
did not see in training), the model is untied, as transformers does: the output layer gets its own weight (at PP=1 a copy of the embedding's local
shard, [V/p, h]), Megatron's ``share_embeddings_and_output_weights`` is turned off on every
stage, and the model's spec reads ``tie_word_embeddings=False``, so :func:`save_pretrained`
writes ``lm_head.weight`` and a config transformers loads untied. No communication.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from dist_lora.layers.wrapper import BaseWrapper
from dist_lora.models.loading import model_info
from dist_lora.models.spec import spec_from_config

_MEGATRON_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


def _base(module: nn.Module) -> nn.Module:
    """The Megatron layer itself, also when an adapter wrapper stands in for it."""
    return module.base_layer if isinstance(module, BaseWrapper) else module


def is_tied(model: nn.Module) -> bool:
    return model_info(model).spec.tied_embeddings


def output_layer(model: nn.Module) -> nn.Module | None:
    """The output layer of this stage (or the wrapper standing in for it); ``None`` off the last stage."""
    return getattr(model, "output_layer", None) if getattr(model, "post_process", False) else None


def word_embeddings(model: nn.Module) -> nn.Module | None:
    """The word embedding of this stage (or its wrapper); ``None`` off the first stage."""
    embedding = getattr(model, "embedding", None) if getattr(model, "pre_process", False) else None
    return None if embedding is None else embedding.word_embeddings


def untie_output_layer(model: nn.Module) -> Callable[[], None]:
    """Untie ``model`` (this rank's stage) as the module docstring says; returns the undo."""
    info = model_info(model)
    undo = []
    output = output_layer(model)
    if output is not None and _base(output).weight is None:  # PP=1: the head reads the embedding
        layer, source = _base(output), model.shared_embedding_or_output_weight()
        weight = nn.Parameter(source.detach().clone(), requires_grad=False)
        for attr in _MEGATRON_ATTRS:
            if hasattr(source, attr):
                setattr(weight, attr, getattr(source, attr))
        layer.weight = weight

        def give_back(layer=layer):
            layer.weight = None
        undo.append(give_back)
    shared = model.share_embeddings_and_output_weights
    model.share_embeddings_and_output_weights = False
    config = {**info.spec.hf_config, "tie_word_embeddings": False}
    model.dist_lora = dataclasses.replace(info, spec=spec_from_config(config))

    def retie():
        for step in undo:
            step()
        model.share_embeddings_and_output_weights = shared
        model.dist_lora = info
    return retie
