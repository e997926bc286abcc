"""``add_weighted_adapter`` on a plain (unsharded) Hugging Face model, one process, against PEFT's
on the same model and adapters: the path a DeepSpeed-wrapped HF model takes. The second adapter
targets layers the first one already wrapped, and the embedding. DARE: PEFT's RNG draw is
replaced by our seeded mask of the same tensor (see ``peft_helpers``); SVD types: factors up to the
sign convention of each singular pair."""

from __future__ import annotations

import copy

import pytest
import torch

import dist_lora as dl
from dist_lora.adapters.registry import existing
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model
from tests.combine.peft_helpers import peft_with_our_dare_masks, signed

SEED = 7
CONFIGS = {
    "one": dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj",
                                                                            "embed_tokens"]),
    "two": dict(r=4, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "o_proj", "embed_tokens"]),
}
CASES = {
    "linear": dict(combination_type="linear"),
    "cat": dict(combination_type="cat"),
    "svd": dict(combination_type="svd"),
    "ties": dict(combination_type="ties", density=0.4, majority_sign_method="frequency"),
    "magnitude_prune": dict(combination_type="magnitude_prune", density=0.7),
    "dare_ties_svd": dict(combination_type="dare_ties_svd", density=0.5),
}


@pytest.fixture(scope="module")
def models():
    import peft

    base = hf_model(TINY_CONFIGS["llama"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIGS["one"]), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(**CONFIGS["two"]))
    ours = copy.deepcopy(base)
    dl.apply_lora(ours, dl.LoraConfig(**CONFIGS["one"]), "one")
    dl.add_adapter(ours, dl.LoraConfig(**CONFIGS["two"]), "two")
    for name in ("one", "two"):
        dl.set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    return theirs, ours


@pytest.mark.parametrize("name", list(CASES))
def test_combination_equals_peft_on_a_plain_model(models, name):
    import peft

    theirs, ours = models
    patches = peft_with_our_dare_masks(theirs, name, SEED) if "dare" in name else []
    for p in patches:
        p.start()
    try:
        theirs.base_model.add_weighted_adapter(["one", "two"], [0.7, -1.3], name, **CASES[name])
    finally:
        for p in patches:
            p.stop()
    ref = {k: v for k, v in peft.get_peft_model_state_dict(theirs, adapter_name=name).items()
           if not k.endswith("base_layer.weight")}
    dl.add_weighted_adapter(ours, ["one", "two"], [0.7, -1.3], name, seed=SEED, **CASES[name])
    got = dl.adapter_state_dict(ours, name)
    if name.endswith("svd"):
        ref = signed(ref)
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert rel_error(got[key], ref[key]) <= 1e-4, key


def test_bad_input_leaves_the_plain_model_as_it_was(models):
    _, ours = models
    before = dict(dl.adapter_state_dict(ours, "one"))
    with pytest.raises(ValueError, match="needs density"):
        dl.add_weighted_adapter(ours, ["one", "two"], [1.0, 1.0], "bad", combination_type="dare_ties")
    with pytest.raises(ValueError, match="do not exist"):
        dl.add_weighted_adapter(ours, ["one", "three"], [1.0, 1.0], "bad")
    assert "bad" not in existing(ours)
    after = dl.adapter_state_dict(ours, "one")
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_dora_adapters_combine_like_peft():
    """PEFT combines only A and B of DoRA adapters; the new adapter's magnitude is the one its
    (zero-B) initialisation gives, the base row norm. Random magnitudes on the sources prove
    they are not used."""
    import peft

    config = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])
    base = hf_model(TINY_CONFIGS["llama"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(**config))
    ours = copy.deepcopy(base)
    dl.apply_lora(ours, dl.LoraConfig(**config), "one")
    dl.add_adapter(ours, dl.LoraConfig(**config), "two")
    g = torch.Generator().manual_seed(0)
    for name in ("one", "two"):
        state = {k: torch.randn(v.shape, generator=g) * 0.1 + ("magnitude" in k)
                 for k, v in peft.get_peft_model_state_dict(theirs, adapter_name=name).items()}
        peft.set_peft_model_state_dict(theirs, state, adapter_name=name)
        dl.set_adapter_state_dict(ours, state, name)
    theirs.base_model.add_weighted_adapter(["one", "two"], [0.5, 0.8], "mix", combination_type="linear")
    dl.add_weighted_adapter(ours, ["one", "two"], [0.5, 0.8], "mix", combination_type="linear")
    ref, got = peft.get_peft_model_state_dict(theirs, adapter_name="mix"), dl.adapter_state_dict(ours, "mix")
    assert sorted(got) == sorted(ref) and any("magnitude" in k for k in ref)
    for key in ref:
        assert rel_error(got[key], ref[key]) <= 1e-5, key


def test_one_adapter_is_always_linear_like_peft(models):
    """PEFT turns any type into ``linear`` for one adapter (no density needed)."""
    import peft

    theirs, ours = models
    theirs.base_model.add_weighted_adapter(["two"], [-0.6], "single", combination_type="ties")
    dl.add_weighted_adapter(ours, ["two"], [-0.6], "single", combination_type="ties")
    ref = {k: v for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="single").items()
           if not k.endswith("base_layer.weight")}
    got = dl.adapter_state_dict(ours, "single")
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert rel_error(got[key], ref[key]) <= 1e-6, key
