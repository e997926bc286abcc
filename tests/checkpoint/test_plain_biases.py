"""Trained base biases of a plain Hugging Face model (issue 19) against PEFT, single process.

PEFT's ``bias="all"`` trains every bias of the model and saves them all; ``"lora_only"`` trains
the biases of the adapted modules. The same initial adapter, the same AdamW steps: dist_lora's
adapter state must equal PEFT's (every bias included), and the export loaded by PEFT and the
sharded checkpoint loaded into a fresh model must give the trained model's logits.
"""

from __future__ import annotations

import pytest
import torch

import dist_lora as dl
from dist_lora.testing.peft_reference import loss_of, reference_run, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

STEPS, LR = 3, 1e-2
CASES = {
    "all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all", init_lora_weights=False),
    "lora_only": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only",
                      init_lora_weights=False),
}


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 96, (2, 8), generator=g), torch.randint(0, 96, (2, 8), generator=g)


@pytest.mark.parametrize("mode", sorted(CASES))
def test_trained_biases_match_peft_and_travel_with_the_adapter(tmp_path, mode):
    import peft

    ids, labels = _batch()
    ref = reference_run("qwen2", CASES[mode], ids, labels, steps=STEPS, lr=LR)
    model = hf_model(TINY_CONFIGS["qwen2"])
    dl.apply_lora(model, dl.LoraConfig(**CASES[mode]))
    dl.set_adapter_state_dict(model, ref["state"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model(ids).logits, labels).backward()
        optimizer.step()
    ours = dl.adapter_state_dict(model)
    assert sorted(ours) == sorted(ref["final"]), sorted(set(ours) ^ set(ref["final"]))
    worst = max(ours, key=lambda k: rel_error(ours[k], ref["final"][k]))
    assert rel_error(ours[worst], ref["final"][worst]) <= 1e-4, worst
    with torch.no_grad():
        trained = model(ids).logits
    dl.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["qwen2"]), tmp_path / "peft").eval()
    dl.save_adapter(model, tmp_path / "ckpt")
    fresh = hf_model(TINY_CONFIGS["qwen2"])
    dl.load_adapter(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert rel_error(loaded(ids).logits, trained) <= 1e-5, "PEFT on the export"
        assert rel_error(fresh(ids).logits, trained) <= 1e-5, "the reloaded sharded checkpoint"
