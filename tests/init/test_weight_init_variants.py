"""Weight-driven initialisation combined with DoRA and rsLoRA, against PEFT.

Single process on the plain Hugging Face model (dist_lora's TP=1 path; the sharded algebra is
checked at TP=2 in test_weight_init_distributed.py). PEFT computes the DoRA magnitude from the
residual base plus ``scaling * B A`` after PiSSA rewrote the weight; so must we.
"""

from __future__ import annotations

import peft
import pytest
import torch

from dist_lora import LoraConfig, adapter_state_dict, apply_lora
from dist_lora.testing.peft_init_reference import residual_base
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

TOL = 1e-4


def _assert_up_to_sign(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for key in [k for k in ref if ".lora_A." in k]:
        b_key = key.replace(".lora_A.", ".lora_B.")
        sign = torch.sign((ours[key] * ref[key]).sum(1))
        assert rel_error(ours[key] * sign[:, None], ref[key]) <= TOL, key
        assert rel_error(ours[b_key] * sign, ref[b_key]) <= TOL, b_key
    for key in [k for k in ref if "magnitude" in k]:
        assert rel_error(ours[key], ref[key]) <= TOL, key


def _assert_same_base(ours, ref) -> None:
    mine = {k: v for k, v in ours.state_dict().items() if ".lora" not in k}
    mine = {k.replace(".base_layer.", "."): v for k, v in mine.items()}
    theirs = residual_base(ref)
    assert sorted(mine) == sorted(theirs)
    assert max(rel_error(mine[k], theirs[k]) for k in theirs) <= TOL


def test_pissa_with_dora_and_rslora_matches_peft():
    config = dict(r=4, lora_alpha=6, use_dora=True, use_rslora=True, init_lora_weights="pissa",
                  target_modules=["q_proj", "o_proj", "up_proj"])
    ref = peft.get_peft_model(hf_model(TINY_CONFIGS["llama"]), peft.LoraConfig(**config))
    ours = apply_lora(hf_model(TINY_CONFIGS["llama"]), LoraConfig(**config))
    _assert_up_to_sign(adapter_state_dict(ours), peft.get_peft_model_state_dict(ref))
    _assert_same_base(ours, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="PEFT's LoftQ runs where CUDA exists")
def test_peft_loftq_cannot_run_on_a_cpu_only_machine_so_the_reference_patches_the_device():
    """PEFT 0.21's ``loftq_init`` moves the weight to "cuda" (or "xpu") unconditionally; our
    reference (``cpu_loftq``) runs the same bytecode with "cpu" and equals dist_lora."""
    from peft.utils.loftq_utils import loftq_init

    from dist_lora.testing.peft_init_reference import cpu_loftq

    weight = torch.randn(8, 64)
    with pytest.raises((AssertionError, RuntimeError)):
        loftq_init(weight, num_bits=4, reduced_rank=2, num_iter=1)
    with cpu_loftq():
        import peft.tuners.lora.layer as lora_layer

        base, lora_a, lora_b = lora_layer.loftq_init(weight, num_bits=4, reduced_rank=2, num_iter=1)
    assert base.shape == weight.shape and lora_a.shape == (2, 64) and lora_b.shape == (8, 2)
