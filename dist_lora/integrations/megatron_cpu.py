"""Megatron-Core without CUDA: the seven CUDA assumptions of megatron-core and how we meet them.

megatron-core 0.16 runs tensor, sequence, pipeline, data and expert parallelism correctly on CPU
with the gloo backend once seven assumptions are handled. Everything here is a no-op when CUDA is
available (``install()`` returns at once and ``cpu_device_mode()`` is a null context).

1. CUDA is the allocation device: ``torch.cuda.current_device()`` in the tensor-parallel
   mappings (all-gather / reduce-scatter buffers) and ``GlobalMemoryBuffer``, and
   ``device="cuda"`` in the causal / sliding-window attention masks of the softmax.
   -> ``install()`` makes ``current_device()`` return the CPU device and gives the softmax
   mask builders with the same semantics that allocate on the CPU.
2. Attention always enters ``get_cuda_rng_tracker().fork()`` and
   ``model_parallel_cuda_manual_seed`` reads ``torch.cuda.get_rng_state()``.
   -> ``install()`` puts a ``CpuRNGStatesTracker`` in place whose states are CPU generator
   states, and ``seed_model_parallel`` seeds it the way Megatron seeds its CUDA tracker
   (data-parallel seed, tensor-parallel seed ``seed + 2718 + tp_rank``, expert seed).
3. ``WrappedTorchNorm`` refuses ``sequence_parallel``. That is not specific to CPU (a GPU
   without apex or Transformer Engine has the same problem), so the replacement lives with the
   model builder: :class:`dist_lora.models.norm.TorchNorm`.
4. The pipeline schedules contain ``device="cuda"`` literals and ``torch.cuda.synchronize()``,
   and a last pipeline stage with tied embeddings moves its weight with ``.cuda()`` while the
   model is built.
   -> ``cpu_device_mode()`` is a ``TorchFunctionMode`` that maps CUDA devices to the CPU for
   the duration of a schedule or a model construction, and the model config sets
   ``batch_p2p_sync=False``.
5. megatron-core 0.19's data-parallel bucket sync (``_ParamAndGradBucketGroup.start_grad_sync``)
   calls ``torch.cuda.current_stream()`` to wait for CUDA-graph events ("Found no NVIDIA
   driver" on CPU). Stream calls do not pass through torch's function hooks, so the mode of 4
   cannot catch them.
   -> ``install()`` makes ``torch.cuda.current_stream()`` return a :class:`NullStream` whose
   waits, records and synchronisation do nothing (CPU work is synchronous).
6. The all-to-all token dispatcher of mixture-of-experts layers creates a side CUDA stream for
   its device-to-host copies of the token counts, orders them with stream waits and events, and
   expects the copies to turn CUDA tensors into numpy split sizes (a host tensor is left a tensor,
   which ``all_to_all_single`` does not take).
   -> ``install()`` gives it a host stream whose waits and events do nothing (host work is
   already in program order), makes it the current stream (so no copy is "on a side stream"), and
   turns host tensors into numpy arrays where the copy would have.
7. NCCL all-gathers pieces of different sizes; gloo does not. The all-to-all dispatcher gathers
   the tokens of an expert-tensor-parallel group (ETP > 1), whose counts differ by rank.
   -> ``install()`` makes Megatron's uneven first-dimension gather pad every piece to the largest,
   gather equal pieces, and cut the padding off (the same result; the backward reduce-scatter of
   uneven pieces works on gloo as it is).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device=cuda...`` (and ``Tensor.cuda()``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def cpu_device_mode() -> contextlib.AbstractContextManager:
    """Context in which CUDA device requests land on the CPU (null context with CUDA)."""
    return contextlib.nullcontext() if cuda_present() else _CudaToCpu()


def _megatron_random():
    from megatron.core.tensor_parallel import random as mpu_random

    return mpu_random


def _make_tracker_class():
    mpu_random = _megatron_random()

    class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker with CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            """Draw from the state ``name``. Nested forks work as Megatron's CUDA tracker does them:
            the enclosing fork's state is stored first (Megatron's transformer block runs inside a
            model-parallel fork under SP, and LoRA dropout forks again inside it)."""
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            outer_name = getattr(self, "_cpu_current_name", None)
            outer = torch.get_rng_state()
            if outer_name is not None:
                self.states_[outer_name] = outer
            torch.set_rng_state(self.states_[name])
            self._cpu_current_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                self._cpu_current_name = outer_name
                torch.set_rng_state(self.states_[outer_name] if outer_name is not None else outer)

    return CpuRNGStatesTracker


class _HostEvent:
    def synchronize(self) -> None:
        """Host work is complete when it returns: nothing to wait for."""


class NullStream:
    """Stand-in for a CUDA stream on a CPU-only host (assumptions 5 and 6): every operation is a
    no-op, since host work runs in program order."""

    device = torch.device("cpu")

    def wait_event(self, event=None) -> None:
        return None

    def wait_stream(self, stream=None) -> None:
        return None

    def record_event(self, event=None):
        return _HostEvent() if event is None else event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_HOST_STREAM = NullStream()


def _host_copy(copy_to_host):
    """Megatron's device-to-host copy of the dispatcher's token counts, for host tensors too."""

    def copy(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return copy_to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return copy


def _padded_uneven_gather(gather):
    """Megatron's ``_gather_along_first_dim`` with uneven ``output_split_sizes`` on gloo
    (assumption 7): pieces padded to the largest, gathered evenly, padding cut off."""

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        sizes = None if output_split_sizes is None else [int(n) for n in output_split_sizes]
        if sizes is None or len(set(sizes)) <= 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        width = max(sizes)
        padded = input_.new_zeros((width, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = gather(padded, group).split(width)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])

    return gather_along_first_dim


def _causal_mask(sq: int) -> torch.Tensor:
    """True above the diagonal: key j is hidden from query i when j > i."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool, device="cpu"), diagonal=1)


def _sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """True where key j is outside ``[i - window_size[0], i + window_size[1]]`` (end-aligned)."""
    keep = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    keep = torch.triu(keep, diagonal=skv - sq - window_size[0])
    keep = torch.tril(keep, diagonal=skv - sq + window_size[1])
    return ~keep


def install() -> None:
    """Make megatron-core usable without CUDA (idempotent; does nothing with CUDA)."""
    global _installed
    if _installed or cuda_present():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")  # assumption 1
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM  # assumptions 5 (megatron-core 0.19) and 6
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _causal_mask
    fused_softmax.get_sliding_window_causal_mask = _sliding_window_mask
    mpu_random = _megatron_random()
    mpu_random._CUDA_RNG_STATE_TRACKER = _make_tracker_class()()  # assumption 2
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HOST_STREAM  # assumption 6
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy(token_dispatcher.maybe_move_tensor_to_cpu)
    from megatron.core.tensor_parallel import mappings

    mappings._gather_along_first_dim = _padded_uneven_gather(mappings._gather_along_first_dim)  # assumption 7
    _installed = True


def seed_model_parallel(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU counterpart of ``model_parallel_cuda_manual_seed`` (same seeds, same state names)."""
    install()
    mpu_random = _megatron_random()
    tracker = mpu_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mpu_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
