"""QLoRA: adapters on a 4-bit (nf4) base, sharded, against single-device PEFT on the same model
whose adapted weights were replaced by their dequantised values (float32 forward).

Each rank quantises only its shard; the test shows this equals the unsharded quantisation by
matching logits, loss and every adapter gradient at TP1 (DP2), TP2, TP2+SP and PP2, for LoRA
and for DoRA (whose weight norm reads the dequantised shard). The float model's logits are far
from the reference, so the comparison would catch an adapter computed on the float weight.
Mistral's tiny dims keep every row-parallel shard a whole number of 32-element blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_lora import LoraConfig, adapter_state_dict, apply_lora, models, quantize_base, set_adapter_state_dict
from dist_lora.integrations.bitsandbytes import quantize_4bit
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import loss_of, peft_key, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

FAMILY, BLOCK, TOL = "mistral", 32, 1e-5
SCENARIOS = {
    "lora": dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                 use_dora=True, init_lora_weights=False),
}


def dequantised_reference(config: dict, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """PEFT on the tiny model after replacing each weight W of the decoder's linear layers (not
    lm_head, as bitsandbytes' load_in_4bit) by dequant(nf4(W))."""
    import peft

    base = hf_model(TINY_CONFIGS[FAMILY])
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize_4bit(module.weight, "nf4", BLOCK).dequantize())
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    logits = model(ids).logits
    loss = loss_of(logits, labels)
    loss.backward()
    grads = {peft_key(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"state": state, "logits": logits.detach(), "loss": loss.detach(), "grads": grads}


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS[FAMILY], tmp / FAMILY)
    g = torch.Generator().manual_seed(5)
    vocab = TINY_CONFIGS[FAMILY]["vocab_size"]
    ids, labels = torch.randint(0, vocab, (4, 8), generator=g), torch.randint(0, vocab, (4, 8), generator=g)
    for name, config in SCENARIOS.items():
        torch.save({"ids": ids, "labels": labels, **dequantised_reference(config, ids, labels)}, tmp / f"{name}.pt")
    return {"base": str(tmp / FAMILY)}


def _rows(ctx, t):
    return t.chunk(ctx.groups.dp_size)[ctx.groups.dp_rank]


@check("tp1", "tp2", "tp2-sp", "pp2")
def qlora_equals_float_peft_on_dequantised_weights(ctx):
    for name, config in SCENARIOS.items():
        ref = torch.load(Path(ctx.tmp) / f"{name}.pt")
        model = models.from_pretrained(ctx.data["base"])
        apply_lora(model, LoraConfig(**config))
        set_adapter_state_dict(model, ref["state"])
        assert rel_error(models.logits(model, ref["ids"]), ref["logits"]) > 1e-3, "float base already matches"
        quantised = quantize_base(model, "nf4", blocksize=BLOCK)
        assert len(quantised) == 4 * (TINY_CONFIGS[FAMILY]["num_hidden_layers"] // ctx.groups.pp_size)
        assert not any(n.endswith(("linear_qkv.weight", "linear_fc2.weight")) for n, _ in
                       model.named_parameters()), "float weights were kept"
        err = rel_error(models.logits(model, ref["ids"]), ref["logits"])
        assert err <= TOL, (name, err)
        micro = 2 if ctx.groups.pp_size > 1 else 1
        loss = forward_backward(model, _rows(ctx, ref["ids"]), _rows(ctx, ref["labels"]), num_microbatches=micro)
        finalize_grads(model)
        grads = adapter_state_dict(model, gradients=True)
        worst = max(ref["grads"], key=lambda k: rel_error(grads[k], ref["grads"][k]))
        assert rel_error(grads[worst], ref["grads"][worst]) <= TOL, (name, worst)
        if ctx.groups.dp_size == 1:
            assert abs(loss.item() - ref["loss"].item()) <= TOL * ref["loss"].item()
        with pytest.raises(RuntimeError, match="4-bit base"):
            from dist_lora import merge_adapter
            merge_adapter(model)


@check("tp2")
def quantize_base_rejects_bad_input_on_every_rank(ctx):
    model = models.from_pretrained(ctx.data["base"])
    apply_lora(model, LoraConfig(r=2, target_modules=["o_proj"]))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(Exception, match="not a multiple of blocksize=64"):
        quantize_base(model, blocksize=64)  # o_proj shards have rows of 32
    with pytest.raises(Exception, match="quant_type='int4'"):
        quantize_base(model, "int4", blocksize=32)
    after = dict(model.named_parameters())
    assert sorted(after) == sorted(before) and all(torch.equal(after[n], before[n]) for n in before)
    quantize_base(model, blocksize=32)
    with pytest.raises(Exception, match="no linear layer to quantise"):
        quantize_base(model, blocksize=32)


test_qlora_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
