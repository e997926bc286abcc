"""Hotswapping on a plain Hugging Face model, one process: under torch.compile (dynamo's
``error_on_recompile``) swaps of adapters with other ranks, alphas and targets neither recompile
nor reallocate and give PEFT's outputs; without ``enable_hotswap`` smaller ranks swap and larger
ones are refused; bad calls change nothing. The sharded layouts run in
``test_hotswap_distributed.py``."""

from __future__ import annotations

import pytest
import torch

import dist_lora as dl
from dist_lora.adapters.registry import existing
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "b": dict(r=8, lora_alpha=3, use_rslora=True, target_modules=TARGETS, rank_pattern={"v_proj": 2},
              alpha_pattern={"model.layers.1.mlp.down_proj": 7}),
    "c": dict(r=2, lora_alpha=16, target_modules=["q_proj", "down_proj"]),  # fewer targets
    "d": dict(r=5, lora_alpha=3, target_modules=TARGETS),
    "e": dict(r=2, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "down_proj"]),
    "saved_1": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "saved_2": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hotswap")
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    logits = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(20 + i)
        model = peft_model("llama", dict(config, init_lora_weights=False)).eval()
        model.save_pretrained(tmp / name)
        with torch.no_grad():
            logits[name] = model(ids).logits
    return tmp, ids, logits


def _storage(model) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in dl.adapter_state_dict(model).items()}


def test_compiled_model_swaps_three_adapters_without_recompiling(saved, tmp_path):
    tmp, ids, logits = saved
    model = hf_model(TINY_CONFIGS["llama"])
    dl.enable_hotswap(model, target_rank=8)  # before the first adapter, as Transformers' enable_peft_hotswap
    dl.import_peft(model, tmp / "a")
    checkpoint = tmp_path / "d_sharded"
    fresh = hf_model(TINY_CONFIGS["llama"])
    dl.import_peft(fresh, tmp / "d")
    dl.save_adapter(fresh, checkpoint)
    storage = _storage(model)
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        assert rel_error(compiled(ids).logits, logits["a"]) <= 1e-5
        for name in ("b", "c", "d"):
            if name == "d":
                dl.load_adapter(compiled, checkpoint)  # a sharded checkpoint swaps in too (hotswap="auto")
            else:
                dl.import_peft(compiled, tmp / name)
            assert rel_error(compiled(ids).logits, logits[name]) <= 1e-5, name
    assert _storage(model) == storage


def test_without_enable_hotswap_smaller_ranks_swap_and_larger_ones_are_refused(saved):
    tmp, ids, logits = saved
    model = hf_model(TINY_CONFIGS["llama"])
    dl.import_peft(model, tmp / "a")
    with pytest.raises(ValueError, match="already exists"):
        dl.import_peft(model, tmp / "e")  # "auto" swaps only after enable_hotswap
    storage = _storage(model)
    dl.import_peft(model, tmp / "e", hotswap=True)  # rank 2 into rank 4: the float scaling changes
    model.eval()  # new adapter modules (here e's dropout) start in training mode, as in PEFT
    with torch.no_grad():
        assert rel_error(model(ids).logits, logits["e"]) <= 1e-5
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj").lora["default"]["all"]
    assert isinstance(q_proj.dropout, torch.nn.Dropout) and q_proj.dropout.p == 0.1
    dl.import_peft(model, tmp / "a", hotswap=True)
    before = _state(model)
    with pytest.raises(ValueError, match=r"has rank 8, above 4.*enable_hotswap\(model, target_rank=8\)"):
        dl.import_peft(model, tmp / "b", hotswap=True)
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before) and _storage(model) == storage
    with torch.no_grad():
        assert rel_error(model(ids).logits, logits["a"]) <= 1e-5


def test_bad_enable_hotswap_calls_change_nothing(saved):
    tmp, _, _ = saved
    model = hf_model(TINY_CONFIGS["llama"])
    dl.import_peft(model, tmp / "b")
    storage = _storage(model)
    with pytest.raises(ValueError, match=r"rank 8 on .*above target_rank=4; pass target_rank >= 8"):
        dl.enable_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="before torch.compile"):
        dl.enable_hotswap(torch.compile(model, backend="eager"), target_rank=8)
    assert _storage(model) == storage
    other = hf_model(TINY_CONFIGS["llama"])
    dl.enable_hotswap(other, target_rank=4)
    with pytest.raises(ValueError, match=r"has rank 8 on .*above target_rank=4 given to enable_hotswap"):
        dl.import_peft(other, tmp / "b")  # refused before the adapter is added
    assert not existing(other)


def test_a_padded_adapter_refuses_training_checkpoints(saved, tmp_path):
    tmp, _, _ = saved
    model = hf_model(TINY_CONFIGS["llama"])
    dl.import_peft(model, tmp / "a")
    dl.enable_hotswap(model, target_rank=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="save it with save_adapter / export_peft"):
        dl.save_training_state(model, optimizer, tmp_path / "state", step=0)
    assert not (tmp_path / "state").exists()


def test_modules_to_save_copies_swap_in_place_and_other_sets_are_refused(saved):
    tmp, ids, logits = saved
    model = hf_model(TINY_CONFIGS["llama"])
    dl.import_peft(model, tmp / "saved_1")
    dl.enable_hotswap(model, target_rank=4)
    storage = _storage(model)
    dl.import_peft(model, tmp / "saved_2")
    with torch.no_grad():
        assert rel_error(model(ids).logits, logits["saved_2"]) <= 1e-5
    before = _state(model)
    with pytest.raises(ValueError, match=r"modules_to_save=None differs from the loaded adapter's \(\['lm_head'\]\)"):
        dl.import_peft(model, tmp / "c")
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before) and _storage(model) == storage
