"""The Megatron-Core CPU support module, against Megatron's own code where it exists."""

from __future__ import annotations

import pytest
import torch

from dist_lora.integrations import megatron_cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the module is a no-op with CUDA")


@pytest.fixture(scope="module", autouse=True)
def installed():
    megatron_cpu.install()


def test_current_device_is_cpu():
    assert torch.cuda.current_device() == torch.device("cpu")
    megatron_cpu.install()  # idempotent
    assert torch.cuda.current_device() == torch.device("cpu")


@pytest.mark.parametrize("sq", [1, 2, 7])
def test_causal_mask_equals_megatrons(sq):
    from megatron.core.transformer import utils

    with megatron_cpu.cpu_device_mode():
        expected = utils.get_default_causal_mask(sq)
    assert torch.equal(megatron_cpu._causal_mask(sq), expected.cpu())


@pytest.mark.parametrize("sq,skv,window", [(6, 6, (2, 0)), (4, 6, (1, 0)), (5, 5, (0, 0)), (5, 5, (4, 1))])
def test_sliding_window_mask_equals_megatrons(sq, skv, window):
    from megatron.core.transformer import utils

    with megatron_cpu.cpu_device_mode():
        expected = utils.get_sliding_window_causal_mask(sq, skv, window)
    assert torch.equal(megatron_cpu._sliding_window_mask(sq, skv, window), expected)


def test_softmax_uses_cpu_masks():
    from megatron.core.fusions import fused_softmax

    assert fused_softmax.get_default_causal_mask is megatron_cpu._causal_mask
    assert fused_softmax.get_sliding_window_causal_mask is megatron_cpu._sliding_window_mask


def test_cpu_device_mode_maps_cuda_requests():
    with megatron_cpu.cpu_device_mode():
        a = torch.ones(2, device="cuda")
        b = torch.zeros(2, device=torch.device("cuda", 0))
        c = a.cuda()
        d = a.to("cuda")
        e = torch.empty(3, device=0)
    for t in (a, b, c, d, e):
        assert t.device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1, device="cuda")  # outside the mode nothing is rewritten


def test_rng_tracker_forks_reproducible_per_tp_rank_streams():
    from megatron.core.tensor_parallel import random as mpu_random

    megatron_cpu.seed_model_parallel(1234, tp_rank=0)
    tracker = mpu_random.get_cuda_rng_tracker()
    assert set(tracker.get_states()) == {mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME,
                                         mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                                         mpu_random._EXPERT_PARALLEL_RNG_TRACKER_NAME}
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer), "fork must restore the default generator"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the forked stream must advance"
    # The model-parallel stream is seed + 2718 + tp_rank, as in model_parallel_cuda_manual_seed.
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(1234 + 2718)))
    megatron_cpu.seed_model_parallel(1234, tp_rank=1)
    with mpu_random.get_cuda_rng_tracker().fork():
        other = torch.rand(4)
    assert not torch.equal(first, other), "TP ranks must get different model-parallel streams"
    megatron_cpu.seed_model_parallel(1234, tp_rank=0)
    with mpu_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first), "re-seeding must reproduce the stream"
    with pytest.raises(KeyError):
        with mpu_random.get_cuda_rng_tracker().fork("no-such-state"):
            pass


def test_current_stream_is_a_null_stream():
    """megatron-core 0.19's bucket sync waits on the current CUDA stream (assumption 5)."""
    stream = torch.cuda.current_stream()
    assert isinstance(stream, megatron_cpu.NullStream)
    stream.wait_event(object())
    stream.wait_stream(torch.cuda.current_stream())
    stream.synchronize()
    assert stream.query()


def test_megatron_version_is_supported_and_expected():
    """The seam's range holds the installed release; a CI job that pins a release
    (``DIST_LORA_EXPECT_MEGATRON``) really runs it."""
    import importlib.metadata
    import os

    from dist_lora.integrations import megatron

    assert megatron.SUPPORTED[0] <= megatron.version() < megatron.SUPPORTED[1]
    expected = os.environ.get("DIST_LORA_EXPECT_MEGATRON")
    if expected:
        assert importlib.metadata.version("megatron-core").split("+")[0] == expected
