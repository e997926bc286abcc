"""QLoRA on a plain Hugging Face model (the DeepSpeed path's layers): dist_lora adapters on
``nn.Linear`` + ``quantize_base`` equal PEFT on the dequantised weights, logits and gradients."""

from __future__ import annotations

import torch

from dist_lora import LoraConfig, adapter_state_dict, apply_lora, quantize_base, set_adapter_state_dict
from dist_lora.testing.peft_reference import loss_of, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model
from tests.quant.test_qlora_distributed import FAMILY, SCENARIOS, dequantised_reference


def test_plain_model_qlora_equals_peft_on_dequantised_weights():
    g = torch.Generator().manual_seed(3)
    vocab = TINY_CONFIGS[FAMILY]["vocab_size"]
    ids, labels = torch.randint(0, vocab, (2, 8), generator=g), torch.randint(0, vocab, (2, 8), generator=g)
    for name, config in SCENARIOS.items():
        ref = dequantised_reference(config, ids, labels)
        model = hf_model(TINY_CONFIGS[FAMILY])
        apply_lora(model, LoraConfig(**config))
        set_adapter_state_dict(model, ref["state"])
        names = quantize_base(model, "nf4", blocksize=32)
        assert "lm_head" not in " ".join(names) and len(names) == 7 * TINY_CONFIGS[FAMILY]["num_hidden_layers"]
        assert isinstance(model.lm_head.weight, torch.nn.Parameter)
        logits = model(ids).logits
        assert rel_error(logits, ref["logits"]) <= 1e-5, name
        loss_of(logits, labels).backward()
        grads = adapter_state_dict(model, gradients=True)
        assert max(rel_error(grads[k], ref["grads"][k]) for k in ref["grads"]) <= 1e-5, name
