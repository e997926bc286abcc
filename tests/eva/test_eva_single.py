"""Single-process pieces of EVA against PEFT: the incremental PCA step, and the config fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_lora import EvaConfig, LoraConfig
from dist_lora.eva.svd import ShardedIncrementalPCA


def _data(steps=4, n=40, h=24):
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(h, h, generator=g) / h ** 0.5
    return [torch.randn(n, h, generator=g) @ mix * torch.linspace(3, 0.1, h) + 0.5 for _ in range(steps)]


@pytest.mark.parametrize("sketch_rank", [None, 24])
def test_incremental_pca_equals_peft_exact_ipca(sketch_rank):
    """Without tensor / data sharding the step is PEFT's IncrementalPCA (full SVD) up to rounding."""
    from peft.utils.incremental_pca import IncrementalPCA

    ref, ours = IncrementalPCA(n_components=6, copy=True), ShardedIncrementalPCA(6, 0.99, sketch_rank=sketch_rank)
    for x in _data():
        ref.partial_fit(x)
        ours.partial_fit(x)
        assert torch.allclose(ours.components, ref.components_.double(), atol=1e-4)  # PEFT's first step is float32
        assert torch.allclose(ours.singular_values, ref.singular_values_.double(), rtol=1e-5)
        assert torch.allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_.double(), rtol=1e-5)
        assert torch.allclose(ours.mean, ref.mean_.double(), atol=1e-6)
        assert torch.allclose(ours.var, ref.var_.double(), rtol=1e-5)
    assert ours.n_seen == int(ref.n_samples_seen_)


def test_eva_config_has_peft_fields_and_round_trips():
    import peft

    assert {f.name for f in dataclasses.fields(EvaConfig)} == {f.name for f in dataclasses.fields(peft.EvaConfig)}
    assert EvaConfig().to_dict() == {f.name: f.default for f in dataclasses.fields(peft.EvaConfig)}
    config = LoraConfig(r=4, init_lora_weights="eva", eva_config=EvaConfig(rho=1.5, whiten=True))
    again = LoraConfig.from_dict(config.to_dict())
    assert again.eva_config == config.eva_config
    assert peft.LoraConfig(**{k: v for k, v in config.to_dict().items() if k != "eva_config"},
                           ).init_lora_weights == "eva"
    assert LoraConfig(init_lora_weights="eva").eva_config == EvaConfig()  # PEFT's default
    for bad, field in ((dict(rho=0.99), "rho"), (dict(tau=1.5), "tau")):
        with pytest.raises(ValueError, match=field):
            EvaConfig(**bad)
