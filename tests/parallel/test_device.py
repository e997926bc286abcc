"""Backend, GPU-count and dtype checks of the device seam (dist_lora.parallel.device), and the
adapter dtype choice (dist_lora.adapters.precision). On a CPU-only machine the GPU count is
patched; the real check runs in the GPU tests (tests/gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_lora import parallel
from dist_lora.adapters.precision import resolve_dtype
from dist_lora.parallel import device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


@no_cuda
def test_default_backend_and_device_without_cuda():
    assert device.choose_backend(None) == "gloo"
    assert device.local_device() == torch.device("cpu")
    assert device.collective_device() == torch.device("cpu")


@no_cuda
def test_nccl_without_cuda_fails_before_any_process_group_starts():
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA.*use backend='gloo'"):
        parallel.initialize(backend="nccl")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="backend='mpi' is not supported; use 'nccl'"):
        device.choose_backend("mpi")


@pytest.mark.parametrize("env,count,ok", [({"LOCAL_WORLD_SIZE": "8"}, 4, False), ({"LOCAL_WORLD_SIZE": "4"}, 4, True),
                                          ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 1, False), ({}, 1, True)])
def test_more_ranks_on_a_node_than_gpus_is_refused_with_nccl_on_every_rank(monkeypatch, env, count, ok):
    """Every rank of the node reads the same launcher variable, so all of them refuse (local rank 0 too)."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if ok:
        device.check_gpus("nccl", 0, 4, 1)
        return
    with pytest.raises(ValueError, match=r"tensor_parallel x pipeline_parallel = 4 x 2 runs \d rank\(s\) on this "
                                         rf"node, but it sees {count} GPU\(s\).*backend='gloo'"):
        device.check_gpus("nccl", 0, 4, 2)
    device.check_gpus("gloo", 0, 4, 2)  # gloo may share a GPU


def test_a_dtype_megatron_cannot_build_is_named():
    for bad in (torch.float64, torch.int8):
        with pytest.raises(ValueError, match=rf"dtype={bad} is not supported: a model is built in"):
            device.check_dtype(bad)
    for good in device.FLOAT_DTYPES:
        device.check_dtype(good, device=torch.device("cpu"))


def test_adapter_dtype_choices():
    assert resolve_dtype(None, torch.bfloat16) == torch.float32
    assert resolve_dtype(None, torch.float16) == torch.float32
    assert resolve_dtype(None, torch.float32) == torch.float32
    assert resolve_dtype("float32", torch.bfloat16) == torch.float32
    assert resolve_dtype("base", torch.bfloat16) == torch.bfloat16
    assert resolve_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert resolve_dtype("bfloat16", None) == torch.bfloat16
    for bad in ("half-ish", torch.int8, 3):
        with pytest.raises(ValueError, match="adapter_dtype=.* is not supported; use None / 'float32'"):
            resolve_dtype(bad, torch.float32)
