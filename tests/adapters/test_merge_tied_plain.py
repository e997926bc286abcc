"""merge_and_unload of a tied-embedding Hugging Face model whose lm_head is in ``modules_to_save``
(issue 19), against PEFT, single process: the head is untied (the embedding keeps its weights),
``tie_word_embeddings`` becomes False, and the saved model reloads with the trained logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import dist_lora as dl
from dist_lora.adapters.registry import saved_modules
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
              init_lora_weights=False)


def test_tied_saved_head_is_untied_like_peft(tmp_path):
    import peft

    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(6))
    reference = peft_model("qwen2", CONFIG)
    with torch.no_grad():
        reference.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)  # a trained head
    state = {k: v.clone() for k, v in peft.get_peft_model_state_dict(reference).items()}
    with torch.no_grad():
        expected = reference(ids).logits
    model = hf_model(TINY_CONFIGS["qwen2"])
    embedding = model.model.embed_tokens.weight.detach().clone()
    dl.apply_lora(model, dl.LoraConfig(**CONFIG))
    dl.set_adapter_state_dict(model, state)
    assert len(list(saved_modules(model))) == 1
    merged = dl.merge_and_unload(model)
    assert torch.equal(merged.model.embed_tokens.weight, embedding), "the embedding changed"
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        assert rel_error(merged(ids).logits, expected) <= 1e-5
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_error(loaded(ids).logits, expected) <= 1e-5
