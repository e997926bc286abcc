"""Sharded LoRA / rsLoRA / DoRA against single-device PEFT, on every layout, in one 4-rank launch.

For each scenario the parent runs PEFT on the unsharded HF model (the oracle: initial adapter,
logits, loss, every adapter gradient, the adapter after 3 AdamW steps). Each worker loads the
same base into Megatron, applies the same config, shards PEFT's initial adapter onto its layout
and must reproduce all of it. At world size 4: ``tp1`` = DP4, ``tp2`` = TP2 x DP2, ``tp4``,
``tp2-sp`` = TP2 + SP x DP2, ``pp2`` = PP2 x DP2, ``tp2-pp2``. Data-parallel ranks each take
their share of the batch and average gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_lora import LoraConfig, adapter_state_dict, apply_lora, models, set_adapter_state_dict
from dist_lora.models.training import clip_grad_norm, finalize_grads, forward_backward
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import reference_run, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

LAYOUTS = ("tp1", "tp2", "tp4", "tp2-sp", "pp2", "tp2-pp2")
BATCH, SEQ, STEPS, LR = 4, 8, 3, 1e-2
# AdamW divides each gradient element by its own RMS: with the default eps (1e-8), elements of
# size ~1e-9 turn float rounding differences (~1e-11) into percent-size step differences. An eps
# of 1e-6, used on both sides, keeps the comparison about the gradients, not about that noise.
ADAM_EPS = 1e-6
TOL = 1e-5

SCENARIOS = {
    "lora_all_linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "rslora_patterns": ("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                                      alpha_pattern={"v_proj": 3})),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])),
    "embedding_and_lm_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "v_proj"])),
    "qwen_lora_bias_bias_all": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"],
                                              lora_bias=True, bias="all")),
    "qwen_bias_lora_only_tied_lm_head": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                                       bias="lora_only")),
    "modules_to_save_lm_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["v_proj", "k_proj"],
                                              modules_to_save=["lm_head"])),
    "mistral_dora_sliding_window": ("mistral", dict(r=2, lora_alpha=4, use_dora=True, target_modules="all-linear")),
}
# One adapter over the fused Megatron layer: PEFT's equivalent is q/k/v (gate/up) adapters that
# share one A. Their A gradients add up in the shared A; B gradients and outputs are per projection.
FUSED = ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]))
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _batch(vocab: int):
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def _tie_fused_a(state: dict) -> dict:
    state = dict(state)
    for layer in range(TINY_CONFIGS["llama"]["num_hidden_layers"]):
        for group in FUSED_GROUPS:
            part = "self_attn" if group[0] == "q_proj" else "mlp"
            keys = [f"base_model.model.model.layers.{layer}.{part}.{p}.lora_A.weight" for p in group]
            for key in keys[1:]:
                state[key] = state[keys[0]].clone()
    return state


def prepare(tmp: Path) -> dict:
    data = {}
    for family in ("llama", "qwen2", "mistral"):
        save_tiny(TINY_CONFIGS[family], tmp / family)
        data[family] = str(tmp / family)
    for name, (family, config) in list(SCENARIOS.items()) + [("fused", FUSED)]:
        ids, labels = _batch(TINY_CONFIGS[family]["vocab_size"])
        config = dict(config, init_lora_weights=False)  # random A and B: nothing is trivially zero
        state = None
        if name == "fused":
            state = _tie_fused_a(reference_run(family, config, ids, labels, steps=1)["state"])
        ref = reference_run(family, config, ids, labels, steps=STEPS, lr=LR, eps=ADAM_EPS, state=state)
        torch.save({"ids": ids, "labels": labels, **ref}, tmp / f"ref_{name}.pt")
    return data


def _model(ctx, name, family, config, state):
    model = models.from_pretrained(ctx.data[family])
    apply_lora(model, LoraConfig(**dict(config, init_lora_weights=False)))
    set_adapter_state_dict(model, state)
    return model


def _my_rows(ctx, tensor):
    g = ctx.groups
    return tensor.chunk(g.dp_size)[g.dp_rank]


def _assert_close(ours: dict, ref: dict, what: str, tol: float = TOL):
    assert sorted(ours) == sorted(ref), (what, sorted(set(ours) ^ set(ref)))
    worst = max(ref, key=lambda k: rel_error(ours[k], ref[k]))
    err = rel_error(ours[worst], ref[worst])
    assert err <= tol, f"{what}: {worst} relative error {err:.2e}"


def _mean_over_dp(ctx, value: float) -> float:
    everyone = all_gather_object((ctx.groups.tp_rank, ctx.groups.pp_rank, value))
    mine = [v for tp, pp, v in everyone if tp == ctx.groups.tp_rank and pp == ctx.groups.pp_rank]
    return sum(mine) / len(mine)


def _microbatches(ctx) -> int:
    return 2 if ctx.groups.pp_size > 1 else 1


@check(*LAYOUTS)
def logits_loss_gradients_and_adamw_steps_match_peft(ctx):
    for name, (family, config) in SCENARIOS.items():
        ref = torch.load(Path(ctx.tmp) / f"ref_{name}.pt")
        model = _model(ctx, name, family, config, ref["state"])
        logits = models.logits(model, ref["ids"])
        assert rel_error(logits, ref["logits"]) <= TOL, (name, rel_error(logits, ref["logits"]))
        ids, labels = _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"])
        loss = forward_backward(model, ids, labels, num_microbatches=_microbatches(ctx))
        finalize_grads(model)
        mean_loss = _mean_over_dp(ctx, loss.item())
        assert abs(mean_loss - ref["loss"].item()) <= TOL * ref["loss"].item(), (name, mean_loss, ref["loss"].item())
        _assert_close(adapter_state_dict(model, gradients=True), ref["grads"], f"{name} gradients")
        global_norm = torch.stack([g.float().pow(2).sum() for g in ref["grads"].values()]).sum().sqrt().item()
        assert abs(clip_grad_norm(model, 0.0) - global_norm) <= 1e-5 * global_norm, f"{name} global grad norm"
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01, eps=ADAM_EPS)
        optimizer.step()
        for _ in range(STEPS - 1):
            optimizer.zero_grad()
            forward_backward(model, ids, labels, num_microbatches=_microbatches(ctx))
            finalize_grads(model)
            optimizer.step()
        final = adapter_state_dict(model)
        ref_final = {k: v for k, v in ref["final"].items() if not k.endswith("base_layer.weight")}
        _assert_close(final, ref_final, f"{name} after {STEPS} AdamW steps", tol=1e-4)


@check("tp1", "tp2", "tp2-sp", "tp2-pp2")
def megatron_ddp_buckets_give_peft_gradients_and_steps(ctx):
    """The same with Megatron-Core's DistributedDataParallel reducing DP gradients in buckets."""
    from dist_lora.models.training import use_megatron_ddp

    for name in ("lora_all_linear", "dora"):
        family, config = SCENARIOS[name]
        ref = torch.load(Path(ctx.tmp) / f"ref_{name}.pt")
        model = _model(ctx, name, family, config, ref["state"])
        use_megatron_ddp(model, bucket_size=4000)  # several buckets even on the tiny model
        ids, labels = _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                      weight_decay=0.01, eps=ADAM_EPS)
        for step in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            forward_backward(model, ids, labels, num_microbatches=_microbatches(ctx))
            if ctx.groups.dp_size > 1:  # the gradients went to DDP's buckets, not to .grad
                assert model.dist_lora.ddp is not None
                assert all(p.grad is None for p in model.parameters() if p.requires_grad)
            finalize_grads(model)
            if step == 0:
                _assert_close(adapter_state_dict(model, gradients=True), ref["grads"], f"{name} DDP gradients")
            optimizer.step()
        ref_final = {k: v for k, v in ref["final"].items() if not k.endswith("base_layer.weight")}
        _assert_close(adapter_state_dict(model), ref_final, f"{name} DDP after {STEPS} AdamW steps", tol=1e-4)


@check("tp1", "tp2", "tp2-sp", "tp2-pp2")
def fused_megatron_adapter_equals_peft_projections_with_shared_a(ctx):
    family, config = FUSED
    ref = torch.load(Path(ctx.tmp) / "ref_fused.pt")
    model = models.from_pretrained(ctx.data[family])
    apply_lora(model, LoraConfig(**dict(config, target_modules=["linear_qkv", "linear_fc1"], init_lora_weights=False)))
    set_adapter_state_dict(model, ref["state"])
    assert rel_error(models.logits(model, ref["ids"]), ref["logits"]) <= TOL
    forward_backward(model, _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"]), _microbatches(ctx))
    finalize_grads(model)
    grads = adapter_state_dict(model, gradients=True)
    expected = dict(ref["grads"])
    for key in [k for k in expected if k.endswith("lora_A.weight")]:
        for group in FUSED_GROUPS:
            proj = next((p for p in group if f".{p}." in key), None)
            if proj:
                expected[key] = sum(ref["grads"][key.replace(f".{proj}.", f".{p}.")] for p in group)
    _assert_close(grads, expected, "fused adapter gradients")


test_lora_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)
