"""The adapter a recipe trains: its method (``lora`` or ``adalora`` section), its initialisation,
what a training step adds for it, and its release.

* LoRA with ``init_lora_weights`` True / False / "gaussian": applied, trained, exported as is.
* "pissa", "pissa_niter_K", "olora": the initialisation rewrites the base weights (``W - B0 A0``),
  so the adapter is released converted to the *original* base (PEFT's
  ``path_initial_model_for_weight_conversion``: rank and alpha doubled): the initial adapter is
  exported to ``<output.dir>/initial_adapter`` before the first step and used at the end. A
  4-bit base is refused with them (the converted adapter would be released for a base other
  than the one trained on).
* "loftq": the base becomes the nf4 quantisation of ``W`` (LoftQ's ``D``), which the recipe's
  ``model.quantize: nf4`` with 64-value blocks re-quantises to the same codes; so LoftQ needs that
  base, and ``loftq_iter: 1`` (more iterations quantise ``W - L R``, a base that cannot be rebuilt
  from the model directory the adapter is released for).
* "eva": after ``apply_lora`` the components come from the first epoch of the training data, each
  data-parallel rank reading its own batches (:func:`dist_lora.initialize_lora_eva_weights`). A
  resumed job computes them again (same data, same answer) to rebuild the adapter's shapes before
  loading the checkpoint into it.
* AdaLoRA (``adalora`` section, :class:`dist_lora.AdaLoraConfig` fields; ``total_step`` defaults
  to ``train.steps``): each step adds the orthogonality penalty's gradients and ends with
  :func:`dist_lora.update_and_allocate`; the release is PEFT's AdaLoRA format in ``adapter``
  and the equivalent plain LoRA (Lambda folded into A, integer ``rank_pattern``) in
  ``adapter_lora``. Megatron recipe only: under ZeRO the gradients the allocator scores are
  partitioned inside DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import dist_lora as dl
from dist_lora.adalora.export import export_adalora
from dist_lora.adalora.orth import orth_reg_loss
from dist_lora.config.adalora import AdaLoraConfig
from dist_lora.config.init_names import weight_method
from dist_lora.config.lora import LoraConfig

if TYPE_CHECKING:  # the recipe config imports this module to check the adapter section
    from dist_lora.recipes.config import FinetuneConfig

INITIAL = "initial_adapter"
LOFTQ_BLOCKSIZE = 64


def adapter_config(config: FinetuneConfig) -> LoraConfig:
    """The ``lora`` section as a ``LoraConfig``, or the ``adalora`` section as an ``AdaLoraConfig``."""
    if config.adalora:
        return AdaLoraConfig(**{"total_step": config.train.steps, **config.adalora})
    return LoraConfig(**config.lora)


def method(config: FinetuneConfig) -> str:
    """``adalora``, or the LoRA initialisation's name (``lora`` for the plain ones)."""
    if config.adalora:
        return "adalora"
    init = config.lora.get("init_lora_weights", True)
    if init == "eva":
        return "eva"
    chosen = weight_method(init)
    return "lora" if chosen is None else chosen[0]


def check(config: FinetuneConfig, runner: str) -> None:
    """Raise ``ValueError`` if the recipe's adapter cannot be trained and released by ``runner``
    (``megatron``, ``deepspeed``, or None for the checks of every runner); called before any
    process group starts."""
    if config.lora and config.adalora:
        raise ValueError("config has both a lora and an adalora section; keep the one to train")
    section = "adalora" if config.adalora else "lora"
    try:
        adapter = adapter_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config section {section}: {err}") from err
    name = method(config)
    quantize = config.model.quantize
    if name == "adalora":
        if runner == "deepspeed":
            raise ValueError("adalora is trained by launch/finetune.py only: under DeepSpeed ZeRO the gradients "
                             "that AdaLoRA's allocator scores are partitioned inside the engine; use a lora section")
        if adapter.total_step > config.train.steps:
            raise ValueError(f"adalora.total_step={adapter.total_step} is beyond train.steps={config.train.steps}: "
                             f"the budget schedule would never finish; lower it or leave it out (= train.steps)")
    elif name in ("pissa", "olora") and quantize is not None:
        raise ValueError(f"lora.init_lora_weights={config.lora['init_lora_weights']!r} with model.quantize={quantize}: "
                         f"the adapter is released converted to the original float base, not the 4-bit one it "
                         f"was trained with; drop model.quantize, or use init_lora_weights: loftq for a 4-bit base")
    elif name == "loftq":
        iterations = (adapter.loftq_config or {}).get("loftq_iter", 1)
        if quantize != "nf4" or config.model.quantize_blocksize != LOFTQ_BLOCKSIZE:
            raise ValueError(f"lora.init_lora_weights='loftq' initialises for an nf4 base with {LOFTQ_BLOCKSIZE}-value "
                             f"blocks: set model.quantize: nf4 and model.quantize_blocksize: {LOFTQ_BLOCKSIZE}")
        if iterations != 1:
            raise ValueError(f"lora.loftq_config.loftq_iter={iterations}: with more than one iteration LoftQ's base "
                             f"is the quantisation of W - L R, which the released adapter's base model cannot "
                             f"reproduce; use loftq_iter: 1 in a recipe (or the library API and save that base)")
    elif name == "eva" and runner == "deepspeed":
        raise ValueError("lora.init_lora_weights='eva' is supported by launch/finetune.py (Megatron models); "
                         "the DeepSpeed recipe takes the other initialisations")
    elif name == "eva" and config.data.packing:
        raise ValueError("lora.init_lora_weights='eva' with data.packing: EVA's forward passes take no document "
                         "mask, so packed documents would see each other; set data.packing: false")


@dataclass
class Applied:
    """What :func:`apply` did: the method, the initial adapter to convert against (PiSSA / OLoRA),
    and the 4-bit base (``(quant_type, blocksize)``, or None for a float base)."""

    method: str
    initial: Path | None = None
    quantize: tuple[str, int] | None = None


class _EvaBatches:
    """One epoch of this data-parallel rank's training batches, as EVA's dict batches."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            batch = self.batches(step)
            yield {"input_ids": batch.input_ids, "labels": batch.labels}


def apply(model, config: FinetuneConfig, batches, out: Path) -> Applied:
    """Add the recipe's adapter to ``model``, initialise it, then quantise the base when the recipe
    asks for a 4-bit one (after: initialisations read the float weights). Collective over the job."""
    name, adapter = method(config), adapter_config(config)
    applied = Applied(name)
    if name == "adalora":
        dl.apply_adalora(model, adapter)
    else:
        dl.apply_lora(model, adapter)
    if name == "eva":
        epoch = max(1, len(batches.samples) // (batches.batch * batches.dp_size))
        dl.initialize_lora_eva_weights(model, _EvaBatches(batches, epoch))
    if name in ("pissa", "olora"):
        applied.initial = out / INITIAL
        dl.export_peft(model, applied.initial, overwrite=True)
    if config.model.quantize is not None:
        applied.quantize = (config.model.quantize, config.model.quantize_blocksize)
        dl.quantize_base(model, *applied.quantize)
    return applied


def after_backward(model, applied: Applied) -> torch.Tensor | None:
    """Add what the method adds to the loss's gradients (AdaLoRA's orthogonality penalty);
    returns the penalty (equal on every rank) or None."""
    if applied.method != "adalora":
        return None
    penalty = orth_reg_loss(model)
    penalty.backward()
    return penalty.detach()


def after_step(model, applied: Applied, step: int) -> None:
    """After the optimizer step (gradients still in ``.grad``): AdaLoRA's budget allocation."""
    if applied.method == "adalora":
        dl.update_and_allocate(model, step)


def release(model, applied: Applied, out: Path, base: Path) -> list[Path]:
    """Export the trained adapter in PEFT's format; the directories written (each loads in peft
    on ``base``). Collective."""
    if applied.method == "adalora":
        return [export_adalora(model, out / folder, format=form, base_model_name_or_path=str(base), overwrite=True)
                for folder, form in (("adapter", "adalora"), ("adapter_lora", "lora"))]
    return [dl.export_peft(model, out / "adapter", base_model_name_or_path=str(base), overwrite=True,
                           path_initial_model_for_weight_conversion=applied.initial)]
