"""Start (or re-lay) the process groups of a job: torch.distributed plus Megatron's parallel state."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from dist_lora.integrations import megatron_cpu
from dist_lora.integrations.megatron import model_parallel_cuda_manual_seed, parallel_state
from dist_lora.parallel import faults, rendezvous
from dist_lora.parallel.device import check_gpus, choose_backend
from dist_lora.parallel.groups import ParallelGroups
from dist_lora.parallel.launch_env import LaunchEnv, detect

DEFAULT_TIMEOUT_S = 1800
_TORCH_DEFAULTS = (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout)

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


def _default_group_timeout(timeout: datetime.timedelta | None) -> None:
    """Make ``timeout`` torch's default for groups created without one (``new_group(timeout=None)``,
    as DeepSpeed creates them); ``None`` restores torch's own defaults."""
    c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = (timeout, timeout) if timeout else _TORCH_DEFAULTS


def _start(env: LaunchEnv, backend: str, timeout_s: float) -> str:
    """Start the default process group from ``env``; the address this rank communicates from."""
    master_ip = rendezvous.resolve(env.master_addr, env.origin)
    peers = [host for host in env.peers if host != env.host]
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if backend == "gloo" and not interface and env.world_size > 1:
        interface = rendezvous.gloo_interface(master_ip, peers)
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = interface  # read by every gloo group torch creates
    address = rendezvous.address_of(interface) if interface else None
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.owns_store:
        store = rendezvous.open_store(env.master_addr, env.master_port, env.rank, env.world_size, env.token,
                                      timeout_s, env.origin)
        dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    return address or rendezvous.source_address(master_ip) or master_ip


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
    backend is nccl with CUDA and gloo without; ``backend`` overrides it (``"gloo"`` with CUDA lets
    ranks share a GPU). With CUDA the current device becomes ``cuda:LOCAL_RANK``, the device models
    are built on (:mod:`dist_lora.parallel.device`). nccl without CUDA, or more ranks on a node
    than it has GPUs, raise on every rank before any process group starts. Calling
    ``initialize`` again with another layout tears down Megatron's parallel state and builds the
    new one on the same processes.

    ``timeout_s`` (default ``$DIST_LORA_TIMEOUT_S`` or 1800 s) bounds the rendezvous and every
    collective of every process group of the job: the default group, Megatron's TP / PP / DP /
    model-parallel groups, and any group created later without a timeout of its own (DeepSpeed's),
    so a lost rank or a cut link makes the others fail within it instead of hanging. Launcher
    problems (a name that does not resolve, a port in use, an inconsistent Slurm environment) raise
    :class:`~dist_lora.parallel.launch_env.LaunchError` before any wait; see
    :mod:`dist_lora.parallel.rendezvous`.

    ``expert_parallel`` (EP) and ``expert_tensor_parallel`` (ETP) lay out the experts of
    mixture-of-experts layers (see :class:`ParallelGroups`): each stage's ranks are
    ``etp x ep x edp``. ETP defaults to 1 (Megatron-Core's own default is the TP size).
    """
    global _current

    timeout = float(timeout_s or os.environ.get("DIST_LORA_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        env = detect()
        _validate(env.world_size, tensor_parallel, pipeline_parallel, sequence_parallel, expert_parallel,
                  expert_tensor_parallel)
        chosen = choose_backend(backend)  # device / backend selection: dist_lora.parallel.device
        check_gpus(chosen, env.local_rank, tensor_parallel, pipeline_parallel)
        if torch.cuda.is_available():  # nccl: one GPU per local rank (checked); gloo may share one
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        address = _start(env, chosen, timeout)
        launcher, local_rank = env.launcher, env.local_rank
    else:
        _validate(dist.get_world_size(), tensor_parallel, pipeline_parallel, sequence_parallel, expert_parallel,
                  expert_tensor_parallel)
        launcher = "external"
        local_rank = _current.local_rank if _current is not None else int(os.environ.get("LOCAL_RANK", 0))
        address = None
    _default_group_timeout(datetime.timedelta(seconds=timeout))
    if address is not None:
        faults.record(os.environ.get("SLURMD_NODENAME") or socket.gethostname(), address, timeout)

    megatron_cpu.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=timeout / 60,  # Megatron's groups would otherwise wait 30 minutes
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    reseed(seed)

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


def reseed(seed: int) -> None:
    """Seed every random stream of training as :func:`initialize` does: the default generator
    (equal on every rank) and Megatron's RNG tracker, whose model-parallel state (``seed + 2718 +
    tp_rank``) draws attention dropout and the LoRA dropout of TP-split inputs, its expert state
    (``seed + 1024 + 100 * ep_rank + etp_rank``) the experts'. Use it to repeat
    a run in the same processes; Megatron's parallel state must be initialised."""
    if megatron_cpu.cuda_present():
        model_parallel_cuda_manual_seed(seed)
    else:
        megatron_cpu.seed_model_parallel(seed, parallel_state.get_tensor_model_parallel_rank(),
                                         parallel_state.get_expert_model_parallel_rank(),
                                         parallel_state.get_expert_tensor_parallel_rank())
    torch.manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    global _current
    _current = None
    faults.forget()
    _default_group_timeout(None)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
