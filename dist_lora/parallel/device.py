"""Where tensors live: this process's device, the device a backend's collectives take, and the
checks that a job's devices, backend and dtype fit before any weight is loaded.

* **The local device** is ``cuda:LOCAL_RANK`` when CUDA is available (``initialize`` makes it
  the current CUDA device) and the CPU otherwise. Models are built on it, adapters are created
  on the device of the weight they adapt, and every other tensor dist_lora creates takes the
  device of the tensors it meets (``device=x.device``, ``x.new_zeros``): nothing is created on
  an implicit default device.
* **The backend** is ``nccl`` with CUDA and ``gloo`` without; ``initialize(backend=...)``
  overrides it (``gloo`` with CUDA lets several ranks share one GPU, which NCCL refuses).
* **Collective tensors** that meet no other tensor (an error flag, a count) are made on
  :func:`collective_device`: the local CUDA device for ``nccl``, the CPU for ``gloo``.
* Deliberate CPU tensors: random numbers come from CPU generators and are then moved (so an
  initialisation is bit-identical on every device and layout), checkpoints are read and written
  through host memory, and the rollback journal keeps its copies on the host.

This module and :mod:`dist_lora.parallel.initialize` are the only places that ask which device
or backend a job runs on.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

BACKENDS = ("nccl", "gloo")
CPU = torch.device("cpu")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def local_device() -> torch.device:
    """This process's compute device: the current CUDA device with CUDA, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else CPU


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module without either."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return CPU


def collective_device(group=None) -> torch.device:
    """Where a tensor made only to be sent over ``group`` must live: CUDA for nccl, CPU for gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return local_device()
    return CPU


def choose_backend(requested: str | None) -> str:
    """``requested``, checked against this host, or the default (nccl with CUDA, else gloo)."""
    if requested is None:
        return "nccl" if cuda_available() else "gloo"
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is not supported; use 'nccl' (CUDA GPUs) or 'gloo' "
                         f"(CPU, or several ranks sharing a GPU), or leave it unset to choose by CUDA")
    if requested == "nccl" and not cuda_available():
        raise ValueError("backend='nccl' needs CUDA, but torch.cuda.is_available() is False on this host "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); run where the GPUs and the "
                         "driver are visible with a CUDA build of torch, or use backend='gloo' on the CPU")
    return requested


def ranks_on_this_node(local_rank: int) -> int:
    """How many ranks the launcher starts on this node (at least ``local_rank + 1``)."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return max(int(value), local_rank + 1)
    return local_rank + 1


def check_gpus(backend: str, local_rank: int, tensor_parallel: int, pipeline_parallel: int) -> None:
    """With nccl every rank needs a GPU of its own: raise if this node starts more ranks than it
    has GPUs. Every rank of the node reaches the same verdict from the launcher's variables
    (``LOCAL_WORLD_SIZE`` and its Slurm / MPI equivalents), before any process group starts."""
    if backend != "nccl":
        return
    count, ranks = torch.cuda.device_count(), ranks_on_this_node(local_rank)
    if ranks > count:
        raise ValueError(
            f"tensor_parallel x pipeline_parallel = {tensor_parallel} x {pipeline_parallel} runs {ranks} rank(s) "
            f"on this node, but it sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); NCCL needs one GPU per rank: start at most "
            f"{count} processes per node (torchrun --nproc_per_node {count}, more nodes for a larger layout), "
            f"lower tensor_parallel x pipeline_parallel, or pass backend='gloo' to let ranks share a GPU")


def _native_bf16() -> bool:
    """Whether the current GPU computes in bfloat16 natively (not by emulation)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation flag
        return torch.cuda.is_bf16_supported()


def check_dtype(dtype: torch.dtype, setting: str = "dtype", device: torch.device | None = None) -> None:
    """A base dtype Megatron-Core trains in (float32, bfloat16, float16) and ``device`` computes in."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{setting}={dtype} is not supported: a model is built in torch.float32, "
                         f"torch.bfloat16 or torch.float16")
    device = local_device() if device is None else device
    if dtype == torch.bfloat16 and device.type == "cuda" and not _native_bf16():
        raise ValueError(f"{setting}=torch.bfloat16 is not supported by {torch.cuda.get_device_name(device)} "
                         f"(bfloat16 needs compute capability 8.0 or newer); use torch.float16 or torch.float32")
