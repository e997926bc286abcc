"""Start (or re-lay) the process groups of a job: torch.distributed plus Megatron's parallel state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from dist_lora.integrations import megatron_cpu
from dist_lora.integrations.megatron import model_parallel_cuda_manual_seed, parallel_state
from dist_lora.parallel.groups import ParallelGroups
from dist_lora.parallel.launch_env import detect

DEFAULT_TIMEOUT_S = 1800

_current: ParallelGroups | None = None


def current_groups() -> ParallelGroups:
    """The groups of the last ``initialize`` call (for entry points that default to them)."""
    if _current is None:
        raise RuntimeError("dist_lora.parallel.initialize(...) has not been called in this process")
    return _current


def _validate(world: int, tensor_parallel: int, pipeline_parallel: int, sequence_parallel: bool,
              expert_parallel: int = 1, expert_tensor_parallel: int = 1) -> None:
    for name, value in (("tensor_parallel", tensor_parallel), ("pipeline_parallel", pipeline_parallel),
                        ("expert_parallel", expert_parallel), ("expert_tensor_parallel", expert_tensor_parallel)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel x pipeline_parallel = "
            f"{tensor_parallel} x {pipeline_parallel}; launch a multiple of "
            f"{tensor_parallel * pipeline_parallel} processes or change the layout"
        )
    if sequence_parallel and tensor_parallel == 1:
        raise ValueError("sequence_parallel=True needs tensor_parallel > 1 (it shards the sequence over TP)")
    experts, stage = expert_parallel * expert_tensor_parallel, world // pipeline_parallel
    if stage % experts:
        raise ValueError(
            f"the {stage} ranks of a pipeline stage do not split into expert_parallel x expert_tensor_parallel = "
            f"{expert_parallel} x {expert_tensor_parallel} (Megatron lays each stage's ranks out as etp x ep x "
            f"expert-data-parallel); choose sizes whose product divides {stage}"
        )


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    seed: int = 1234,
    timeout_s: float | None = None,
    backend: str | None = None,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
) -> ParallelGroups:
    """Initialise torch.distributed and Megatron's parallel state; return the groups.

    torch.distributed is started from the launcher's environment (torchrun, Slurm, MPI, or a
    single process; see :mod:`dist_lora.parallel.launch_env`) unless it is already running. The
    backend is nccl with CUDA and gloo without. Calling ``initialize`` again with another layout
    tears down Megatron's parallel state and builds the new one on the same processes.

    ``timeout_s`` bounds every collective (default ``$DIST_LORA_TIMEOUT_S`` or 1800 s): a rank
    that dies makes the others fail within it instead of hanging.

    ``expert_parallel`` (EP) and ``expert_tensor_parallel`` (ETP) lay out the experts of
    mixture-of-experts layers (see :class:`ParallelGroups`): each stage's ranks are
    ``etp x ep x edp``. ETP defaults to 1 (Megatron-Core's own default is the TP size).
    """
    global _current

    if not dist.is_initialized():
        env = detect()
        _validate(env.world_size, tensor_parallel, pipeline_parallel, sequence_parallel, expert_parallel,
                  expert_tensor_parallel)
        timeout = timeout_s or float(os.environ.get("DIST_LORA_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend=chosen,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        launcher, local_rank = env.launcher, env.local_rank
    else:
        _validate(dist.get_world_size(), tensor_parallel, pipeline_parallel, sequence_parallel, expert_parallel,
                  expert_tensor_parallel)
        launcher = "external"
        local_rank = _current.local_rank if _current is not None else int(os.environ.get("LOCAL_RANK", 0))

    megatron_cpu.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        create_gloo_process_groups=False,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    if megatron_cpu.cuda_present():
        model_parallel_cuda_manual_seed(seed)
    else:
        megatron_cpu.seed_model_parallel(seed, tp_rank, ep_rank, etp_rank)
    torch.manual_seed(seed)

    _current = ParallelGroups(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_size=tensor_parallel,
        pp_size=pipeline_parallel,
        dp_size=dist.get_world_size() // (tensor_parallel * pipeline_parallel),
        tp_rank=tp_rank,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        sequence_parallel=sequence_parallel,
        backend=dist.get_backend(),
        launcher=launcher,
        seed=seed,
        local_rank=local_rank,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        model_parallel_group=parallel_state.get_model_parallel_group(),
        embedding_group=parallel_state.get_embedding_group(check_initialized=False),
        ep_size=expert_parallel,
        etp_size=expert_tensor_parallel,
        ep_rank=ep_rank,
        etp_rank=etp_rank,
        edp_rank=parallel_state.get_expert_data_parallel_rank(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        etp_group=parallel_state.get_expert_tensor_parallel_group(),
        edp_group=parallel_state.get_expert_data_parallel_group(),
        expert_model_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group(),
    )
    return _current


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    global _current
    _current = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
