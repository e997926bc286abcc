"""The one seam to DeepSpeed (optional: ``pip install 'dist-lora[deepspeed]'``).

dist_lora adapters on a Hugging Face model train under ZeRO stages 0-3 with a client
``torch.optim`` optimizer that holds the adapter parameters only. Two things make the adapter
wrappers ZeRO-3 safe:

* the wrapper reads its adapter factors directly instead of calling them as modules, and ZeRO-3
  fetches a module's parameters only when that module is called; so every adapter tensor is
  registered as an *external parameter* of its wrapper (fetched with the wrapper's forward and
  backward). Marking wrappers as ZeRO-3 leaf modules instead is wrong: DeepSpeed reduces a leaf's
  gradients in a module backward hook that can fire before autograd has accumulated the
  gradient of ``lora_B`` (it then reduces zeros and the late accumulation fails);
* :func:`gathered` materialises partitioned parameters for code that reads or writes them
  outside a forward (export, state dicts, merging), and is a no-op for ordinary tensors.

A 4-bit base (:class:`~dist_lora.layers.quantized.QuantizedLinear`) is partitioned too under
ZeRO-3: its packed bytes become a frozen uint8 parameter of the 4-bit layer (fetched with its
forward and backward) and, when an adapter wraps it, an external parameter of the wrapper as well
(which may read the base weight before calling it, e.g. DoRA's norm).

Without a GPU, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported (gloo back-end).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from dist_lora.adapters.registry import wrappers
from dist_lora.layers.quantized import QuantizedLinear
from dist_lora.parallel.initialize import current_groups

INSTALL_HINT = "install it with: pip install 'dist-lora[deepspeed]' (deepspeed>=0.15)"
_SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _deepspeed(feature: str = "the DeepSpeed path"):
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed 0.19 calls collective APIs that torch 2.13 deprecates (all_gather_into_tensor,
    # reduce_scatter_tensor), once per bucket.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `.*_single` instead", category=FutureWarning)
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(f"{feature} needs DeepSpeed, which is not installed; {INSTALL_HINT}") from exc
    # DeepSpeed's communication back-end JIT-compiles its shared-memory all-reduce op in every
    # process it starts. That op serves only ``inference_all_reduce``, which training never calls,
    # and loading it takes torch's build lock under ~/.cache/torch_extensions: a process killed
    # while holding the lock leaves the file behind, and every later DeepSpeed start waits on it
    # forever. Marking the op incompatible makes the back-end use the process group's all-reduce.
    deepspeed.ops.__compatible_ops__[_SHM_COMM_OP] = False
    return deepspeed


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed by ZeRO-3 (its ``.data`` may be an empty placeholder)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned ``params`` hold their full values on every rank.

    With ``modify=True`` the values rank 0 holds at exit are re-partitioned (every rank must
    compute the same update). Collective over the data-parallel group when any parameter is
    partitioned (every rank must enter it with the same parameters); otherwise a no-op."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    with _deepspeed().zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """A DeepSpeed engine for ``model`` on the already initialised process group.

    Adapter tensors become external parameters of their wrappers first (see module docstring).
    DeepSpeed reads the node-local rank from ``LOCAL_RANK``, which only torchrun (and DeepSpeed's
    own launcher) set; under mpiexec or srun it is taken from :func:`dist_lora.parallel.initialize`'s
    launcher detection."""
    deepspeed = _deepspeed()
    if "LOCAL_RANK" not in os.environ:
        try:
            os.environ["LOCAL_RANK"] = str(current_groups().local_rank)
        except RuntimeError:  # the process group was not started by dist_lora: DeepSpeed's own checks apply
            pass
    if int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.partitionable()
    for _, wrapper in wrappers(model):
        for name, param in wrapper.named_parameters():
            if not name.startswith("base_layer.") or name == "base_layer.weight_packed":
                deepspeed.zero.register_external_parameter(wrapper, param)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def save_checkpoint(engine, path, client_state: dict) -> None:
    """DeepSpeed's checkpoint of the trainable state (adapters, their ZeRO optimizer partitions)
    in the directory ``path`` (frozen base weights are not written). Collective."""
    path = os.fspath(path)
    engine.save_checkpoint(os.path.dirname(path), tag=os.path.basename(path), client_state=client_state,
                           save_latest=False, exclude_frozen_parameters=True)


def load_checkpoint(engine, path) -> dict:
    """Restore a :func:`save_checkpoint` directory; returns its ``client_state``. Collective."""
    path = os.fspath(path)
    load_path, client_state = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                                     load_module_strict=False)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
    return client_state
