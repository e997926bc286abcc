"""TorchNorm: torch's norms for Megatron layers, usable under sequence parallelism."""

from types import SimpleNamespace

import pytest
import torch

from dist_lora.models.norm import TorchNorm


@pytest.mark.parametrize("sp", [False, True])
def test_rmsnorm_matches_torch_and_marks_sequence_parallel(sp):
    config = SimpleNamespace(normalization="RMSNorm", params_dtype=torch.float32, sequence_parallel=sp)
    norm = TorchNorm(config, 16, eps=1e-5)
    ref = torch.nn.RMSNorm(16, eps=1e-5)
    x = torch.randn(3, 2, 16)
    assert torch.equal(norm(x), ref(x))
    assert all(p.sequence_parallel is sp for p in norm.parameters())


def test_unknown_norm_is_named():
    config = SimpleNamespace(normalization="ScaleNorm", params_dtype=torch.float32, sequence_parallel=False)
    with pytest.raises(ValueError, match="ScaleNorm"):
        TorchNorm(config, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centered_rmsnorm_equals_gemma3s(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    config = SimpleNamespace(normalization="RMSNorm", params_dtype=dtype, sequence_parallel=True,
                             layernorm_zero_centered_gamma=True)
    norm = TorchNorm(config, 16, eps=1e-6)
    ref = Gemma3RMSNorm(16, eps=1e-6).to(dtype)
    with torch.no_grad():
        weight = torch.randn(16).to(dtype)
        norm.weight.copy_(weight)
        ref.weight.copy_(weight)
    x = torch.randn(3, 2, 16).to(dtype)
    assert norm(x).dtype == dtype and torch.equal(norm(x), ref(x))
    assert all(p.sequence_parallel for p in norm.parameters())
