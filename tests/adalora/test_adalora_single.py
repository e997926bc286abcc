"""AdaLoRA on one process (plain Hugging Face model): bad input, and the physical shrink against peft.

The sharded comparisons with peft live in ``test_adalora_distributed.py``; here the model is the
HF Llama itself (TP = 1), so peft's ``AdaLoraModel`` is the direct reference.
"""

from __future__ import annotations

import pytest
import torch

from dist_lora import (
    AdaLoraConfig,
    adapter_state_dict,
    apply_adalora,
    apply_lora,
    merge_and_unload,
    orth_reg_loss,
    set_adapter_state_dict,
    update_and_allocate,
)
from dist_lora.adalora.export import export_adalora
from dist_lora.adalora.shrink import shrink_to_rank_pattern
from dist_lora.adapters.registry import require_adapter
from dist_lora.config.lora import LoraConfig
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model
from tests.adalora.reference import ADAM_EPS, adalora_reference, shifted

CONFIG = dict(init_r=3, target_r=1, lora_alpha=6, tinit=1, tfinal=2, total_step=9, deltaT=2,
              target_modules=["down_proj", "q_proj", "v_proj"])


@pytest.mark.parametrize("change, message", [
    (dict(total_step=None), "needs total_step"),
    (dict(total_step=3, deltaT=1), "must be larger than tinit \\+ tfinal"),
    (dict(tinit=4, tfinal=5), "must be larger than tinit \\+ tfinal"),
    (dict(target_r=4), "target_r=4 is larger than init_r=3"),
    (dict(beta1=1.0), "beta1 must lie in"),
    (dict(use_dora=True), "DoRA"),
    (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
])
def test_bad_config_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**dict(CONFIG, **change))


def test_config_round_trips_through_peft_json():
    import peft

    ours = AdaLoraConfig(**CONFIG)
    theirs = peft.AdaLoraConfig(**ours.to_dict())
    assert (theirs.init_r, theirs.target_r, theirs.total_step, theirs.tinit, theirs.deltaT) == (3, 1, 9, 1, 2)
    assert AdaLoraConfig.from_dict(ours.to_dict()) == ours


def test_update_before_backward_and_wrong_models_are_refused():
    model = hf_model(TINY_CONFIGS["llama"])
    apply_adalora(model, AdaLoraConfig(**CONFIG))
    before = adapter_state_dict(model)
    with pytest.raises(RuntimeError, match="call it after backward"):
        update_and_allocate(model, 2)
    with pytest.raises(RuntimeError, match="no rank_pattern was learned"):
        update_and_allocate(model, 8)
    with pytest.raises(ValueError, match="non-negative integer"):
        update_and_allocate(model, -1)
    after = adapter_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="AdaLoRA trains exactly one adapter"):
        apply_adalora(model, AdaLoraConfig(**CONFIG), "second")
    lora = hf_model(TINY_CONFIGS["llama"])
    apply_lora(lora, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not AdaLoRA"):
        orth_reg_loss(lora)
    embed = hf_model(TINY_CONFIGS["llama"])
    with pytest.raises(ValueError, match="does not support embedding"):
        apply_adalora(embed, AdaLoraConfig(**dict(CONFIG, target_modules=["embed_tokens"])))


def test_shrink_keeps_logits_and_exports_peft_loads(tmp_path):
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 101, (2, 8), generator=g), torch.randint(0, 101, (2, 8), generator=g)
    steps = CONFIG["total_step"]
    ref = adalora_reference(CONFIG, ids, labels, steps=steps, lr=1e-2)
    model = hf_model(TINY_CONFIGS["llama"])
    apply_adalora(model, AdaLoraConfig(**CONFIG))
    set_adapter_state_dict(model, ref["state"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, eps=ADAM_EPS)
    for step in range(steps):
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted(labels).flatten()) + orth_reg_loss(model)
        loss.backward()
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
        assert require_adapter(model, "default").rank_pattern == ref["patterns"][step], f"step {step}"
    assert ref["patterns"][1] is None and ref["patterns"][2] == ref["patterns"][3] != ref["patterns"][4]  # deltaT=2
    pattern = require_adapter(model, "default").rank_pattern
    assert pattern == ref["patterns"][-1]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        ranks = shrink_to_rank_pattern(model)
        shrunk = model(input_ids=ids).logits
    assert ranks == {k[:-len(".lora_E")]: sum(v) for k, v in pattern.items()}
    assert sum(ranks.values()) == CONFIG["target_r"] * len(ranks)
    assert rel_error(shrunk, full) <= 1e-6 and rel_error(full, ref["final_logits"]) <= 1e-4
    update_and_allocate(model, steps)  # past the schedule: the shrunk pattern is accepted as it is
    import peft

    for fmt in ("adalora", "lora"):
        out = export_adalora(model, tmp_path / fmt, format=fmt)
        loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), str(out))
        with torch.no_grad():
            assert rel_error(loaded(input_ids=ids).logits, shrunk) <= 1e-5, fmt
    merged = merge_and_unload(model)  # merge uses the SVD form's delta: scaling * P (Q * Lambda)
    with torch.no_grad():
        assert rel_error(merged(input_ids=ids).logits, shrunk) <= 1e-5

