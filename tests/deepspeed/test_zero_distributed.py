"""dist_lora adapters on a Hugging Face model under DeepSpeed ZeRO 0-3 (2 data-parallel ranks,
real DeepSpeed on the CPU accelerator), against single-device PEFT on the whole batch.

* every ZeRO stage trains the adapter PEFT trains: after 3 AdamW steps (client optimizer with
  the adapter parameters only) the gathered adapter equals PEFT's (so ZeRO 1, 2 and 3 equal ZeRO 0);
* ZeRO-3: merging gathers the partitioned base weights and the merged weights equal PEFT's
  ``merge_and_unload``; exporting the adapter leaves the base partitioned and loads in peft;
* QLoRA under ZeRO 2 and 3: nf4 base, the adapter equals PEFT's on the dequantised weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_lora import (
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    export_peft,
    merge_adapter,
    quantize_base,
    set_adapter_state_dict,
)
from dist_lora.integrations import deepspeed as ds
from dist_lora.integrations.bitsandbytes import quantize_4bit
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import reference_run, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

FAMILY, STEPS, LR, EPS = "mistral", 3, 1e-2, 1e-6
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)


def _batch():
    g = torch.Generator().manual_seed(2)
    vocab = TINY_CONFIGS[FAMILY]["vocab_size"]
    return torch.randint(0, vocab, (4, 8), generator=g), torch.randint(0, vocab, (4, 8), generator=g)


def prepare(tmp: Path) -> dict:
    ids, labels = _batch()
    ref = reference_run(FAMILY, CONFIG, ids, labels, steps=STEPS, lr=LR, eps=EPS)
    import peft

    merged = peft.get_peft_model(hf_model(TINY_CONFIGS[FAMILY]), peft.LoraConfig(**CONFIG))
    peft.set_peft_model_state_dict(merged, ref["final"])
    ref["merged"] = {k: v.clone() for k, v in merged.merge_and_unload().state_dict().items()}
    torch.save(ref, tmp / "ref.pt")
    deq = hf_model(TINY_CONFIGS[FAMILY])
    with torch.no_grad():
        for name, module in deq.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize_4bit(module.weight, "nf4", 32).dequantize())
    torch.save(reference_run(FAMILY, CONFIG, ids, labels, steps=STEPS, lr=LR, eps=EPS, state=ref["state"], base=deq),
               tmp / "ref_qlora.pt")
    return {}


def _engine(stage: int, state: dict, quantize: bool = False):
    model = hf_model(TINY_CONFIGS[FAMILY]).train()
    apply_lora(model, LoraConfig(**CONFIG))
    set_adapter_state_dict(model, state)
    if quantize:
        quantize_base(model, "nf4", blocksize=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01, eps=EPS)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    return model, ds.initialize(model, optimizer, config)


def _train(ctx, engine, ids, labels):
    rows = slice(2 * ctx.groups.dp_rank, 2 * ctx.groups.dp_rank + 2)
    for _ in range(STEPS):
        logits = engine(ids[rows]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[rows].reshape(-1))
        engine.backward(loss)
        engine.step()


def _assert_adapter(model, expected: dict, what: str):
    ours = adapter_state_dict(model)
    assert sorted(ours) == sorted(expected), what
    worst = max(expected, key=lambda k: rel_error(ours[k], expected[k]))
    assert rel_error(ours[worst], expected[worst]) <= 1e-4, (what, worst, rel_error(ours[worst], expected[worst]))


@check("tp1")
def every_zero_stage_trains_the_peft_adapter(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    ids, labels = _batch()
    for stage in (0, 1, 2, 3):
        model, engine = _engine(stage, ref["state"])
        assert ds.zero_stage(engine) == stage
        _train(ctx, engine, ids, labels)
        _assert_adapter(model, ref["final"], f"ZeRO-{stage}")
    # ZeRO-3: the base is partitioned; export gathers only the adapter
    base = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert ds.is_partitioned(base) and base.numel() == 0
    export_peft(model, Path(ctx.tmp) / "zero3_adapter", overwrite=True)
    assert base.numel() == 0, "exporting the adapter gathered the base"
    merge_adapter(model)
    names = [n for n, _ in model.named_parameters()]
    with ds.gathered(list(model.parameters())):
        state = dict(model.named_parameters())
        for name in names:
            key = name.replace(".base_layer.", ".")
            if ".lora" in name:
                continue
            assert rel_error(state[name], ref["merged"][key]) <= 1e-4, name



@check("tp1")
def qlora_under_zero_trains_the_peft_adapter_of_the_dequantised_model(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref_qlora.pt")
    ids, labels = _batch()
    for stage in (2, 3):
        model, engine = _engine(stage, ref["state"], quantize=True)
        _train(ctx, engine, ids, labels)
        _assert_adapter(model, ref["final"], f"QLoRA ZeRO-{stage}")
        packed = model.model.layers[0].mlp.down_proj.base_layer.weight_packed
        assert packed.dtype == torch.uint8
        if stage == 3:  # the 4-bit bytes are partitioned: each rank keeps half
            assert ds.is_partitioned(packed) and packed.numel() == 0
            assert packed.ds_tensor.numel() == packed.ds_numel // 2, (packed.ds_tensor.numel(), packed.ds_numel)
        else:
            assert not ds.is_partitioned(packed)


test_zero_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
