"""LoRA on routed experts (PEFT's ``target_parameters``) against single-device PEFT, in one 4-rank launch.

The oracle is PEFT on the HF mixture-of-experts model with ``target_parameters=
["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` (every expert its own A and B) plus
attention LoRA, random initial factors, in float32: initial adapter, logits, loss, every adapter
gradient, the adapter after 3 AdamW steps, and the merged model's logits. Each worker shards
PEFT's adapter onto its layout and must reproduce all of it. At world size 4: ``tp1-ep2-etp2``
(every expert split over two ranks, no expert replicas), ``tp1-ep2`` (DP4, two replicas of each
expert), ``tp2-ep2-sp`` (TP2 + SP x DP2), ``tp1-pp2`` (PP2 x DP2, all experts on every rank of a
stage), and for the main check ``tp1-pp2-ep2``. Data-parallel ranks take their share of the batch;
the batch reaches every expert.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.adapters.registry import existing
from dist_lora.checkpoint.merge_release import merge_release
from dist_lora.checkpoint.offline_reshard import reshard_checkpoint
from dist_lora.checkpoint.peft_to_sharded import peft_to_sharded
from dist_lora.models.training import clip_grad_norm, finalize_grads, forward_backward, use_megatron_ddp
from dist_lora.parallel.agreement import RankError, on_every_rank
from dist_lora.parallel.collectives import all_gather_object, barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import peft_model, reference_run, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, experts_reached, hf_model, save_tiny

LAYOUTS = ("tp1-ep2-etp2", "tp1-ep2", "tp2-ep2-sp", "tp1-pp2")
BATCH, SEQ, STEPS, LR, ADAM_EPS, TOL = 4, 12, 3, 1e-2, 1e-6, 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SCENARIOS = {
    "mixtral": ("mixtral", dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS,
                                rank_pattern={"model.layers.1.mlp.experts.down_proj": 3})),
    "mixtral_rslora_gate_up_only": ("mixtral", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj"],
                                                    target_parameters=["mlp.experts.gate_up_proj"],
                                                    alpha_pattern={"model.layers.0.mlp.experts.gate_up_proj": 2})),
    "qwen3_moe": ("qwen3_moe", dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "down_proj"],
                                    target_parameters=EXPERTS, rank_pattern={"mlp.experts.gate_up_proj": 3})),
}


def _batch(vocab: int):
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def prepare(tmp: Path) -> dict:
    data = {}
    for family in {f for f, _ in SCENARIOS.values()}:
        base = save_tiny(TINY_CONFIGS[family], tmp / family)
        data[family] = str(tmp / family)
        ids, _ = _batch(TINY_CONFIGS[family]["vocab_size"])
        experts = TINY_CONFIGS[family].get("num_local_experts", TINY_CONFIGS[family].get("num_experts"))
        assert all(r == set(range(experts)) for r in experts_reached(base, ids)), "the batch misses experts"
    for name, (family, config) in SCENARIOS.items():
        ids, labels = _batch(TINY_CONFIGS[family]["vocab_size"])
        config = dict(config, init_lora_weights=False)  # random A and B: nothing is trivially zero
        ref = reference_run(family, config, ids, labels, steps=STEPS, lr=LR, eps=ADAM_EPS)
        peft = peft_model(family, config, ref["state"])
        peft.save_pretrained(str(tmp / f"peft_{name}"))  # PEFT's own files, for import
        with torch.no_grad():
            merged = peft.merge_and_unload().eval()(ids).logits
        torch.save({"ids": ids, "labels": labels, "merged": merged, **ref}, tmp / f"ref_{name}.pt")
    data["mixtral_aux"] = str(_aux_reference(tmp))
    # an adapter for a Mixtral with 8 experts: it does not fit the 4-expert model
    eight = hf_model({**TINY_CONFIGS["mixtral"], "num_local_experts": 8})
    import peft as peft_lib

    peft_lib.get_peft_model(eight, peft_lib.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS)) \
        .save_pretrained(str(tmp / "peft_eight_experts"))
    return data


AUX = {**TINY_CONFIGS["mixtral"], "output_router_logits": True, "router_aux_loss_coef": 1.0}


def _aux_reference(tmp: Path) -> Path:
    """The tiny Mixtral with transformers' auxiliary loss on (a large coefficient, so that it
    matters), and PEFT's loss and gradients with it, as each data-parallel replica computes them
    on its share of the batch (``dp`` = 2 and 4 shares; 4 is also DP2 x two micro-batches),
    averaged over the shares."""
    from dist_lora.testing.peft_reference import loss_of, trainable

    family, config = SCENARIOS["mixtral"]
    config = dict(config, init_lora_weights=False)
    save_tiny(AUX, tmp / "mixtral_aux")
    ref = _ref_from(tmp, "mixtral")
    out = {}
    for dp in (2, 4):
        model = peft_model(family, config, ref["state"], base=hf_model(AUX))
        losses = []
        for ids, labels in zip(ref["ids"].chunk(dp), ref["labels"].chunk(dp)):
            result = model(ids, output_router_logits=True)
            loss = loss_of(result.logits, labels) + AUX["router_aux_loss_coef"] * result.aux_loss
            (loss / dp).backward()
            losses.append(loss.item())
        grads = {k: p.grad.detach().clone() for k, p in trainable(model).items()}
        assert max(rel_error(grads[k], ref["grads"][k]) for k in grads) > 1e-2, "the auxiliary loss must matter"
        out[dp] = {"loss": sum(losses) / dp, "grads": grads}
    torch.save(out, tmp / "ref_aux.pt")
    return tmp / "mixtral_aux"


def _ref_from(tmp, name):
    return torch.load(Path(tmp) / f"ref_{name}.pt")


def _ref(ctx, name):
    return torch.load(Path(ctx.tmp) / f"ref_{name}.pt")


def _model(ctx, name, state):
    family, config = SCENARIOS[name]
    model = models.from_pretrained(ctx.data[family])
    dl.apply_lora(model, dl.LoraConfig(**dict(config, init_lora_weights=False)))
    dl.set_adapter_state_dict(model, state)
    return model


def _my_rows(ctx, tensor):
    return tensor.chunk(ctx.groups.dp_size)[ctx.groups.dp_rank]


def _microbatches(ctx) -> int:
    return 2 if ctx.groups.pp_size > 1 else 1


def _assert_close(ours: dict, ref: dict, what: str, tol: float = TOL):
    assert sorted(ours) == sorted(ref), (what, sorted(set(ours) ^ set(ref)))
    worst = max(ref, key=lambda k: rel_error(ours[k], ref[k]))
    err = rel_error(ours[worst], ref[worst])
    assert err <= tol, f"{what}: {worst} relative error {err:.2e}"


def _mean_over_dp(ctx, value: float) -> float:
    everyone = all_gather_object((ctx.groups.tp_rank, ctx.groups.pp_rank, value))
    mine = [v for tp, pp, v in everyone if tp == ctx.groups.tp_rank and pp == ctx.groups.pp_rank]
    return sum(mine) / len(mine)


def _train(ctx, model, ref, steps, ddp=False):
    ids, labels = _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"])
    if ddp:
        use_megatron_ddp(model, bucket_size=2000)  # several buckets, expert and dense ones
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01,
                                  eps=ADAM_EPS)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, ids, labels, num_microbatches=_microbatches(ctx))
        finalize_grads(model)
        optimizer.step()
    return optimizer


@check(*LAYOUTS, "tp1-pp2-ep2")
def logits_loss_every_gradient_and_adamw_steps_match_peft(ctx):
    for name in SCENARIOS:
        ref = _ref(ctx, name)
        model = _model(ctx, name, ref["state"])
        _assert_close(dl.adapter_state_dict(model), ref["state"], f"{name} PEFT state round trip", tol=0.0)
        assert rel_error(models.logits(model, ref["ids"]), ref["logits"]) <= TOL, name
        loss = forward_backward(model, _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"]), _microbatches(ctx))
        finalize_grads(model)
        mean_loss = _mean_over_dp(ctx, loss.item())
        assert abs(mean_loss - ref["loss"].item()) <= TOL * ref["loss"].item(), (name, mean_loss)
        _assert_close(dl.adapter_state_dict(model, gradients=True), ref["grads"], f"{name} gradients")
        global_norm = torch.stack([g.float().pow(2).sum() for g in ref["grads"].values()]).sum().sqrt().item()
        assert abs(clip_grad_norm(model, 0.0) - global_norm) <= 1e-5 * global_norm, f"{name} global grad norm"
        model = _model(ctx, name, ref["state"])
        _train(ctx, model, ref, STEPS)
        _assert_close(dl.adapter_state_dict(model), ref["final"], f"{name} after {STEPS} AdamW steps", tol=1e-4)
        dl.check_replicas(model)


@check("tp1-ep2", "tp2-ep2-sp")
def megatron_ddp_expert_buckets_give_peft_steps(ctx):
    """Megatron-Core's DDP reduces expert gradients in buffers of their own (expert-data-parallel)."""
    ref = _ref(ctx, "mixtral")
    model = _model(ctx, "mixtral", ref["state"])
    _train(ctx, model, ref, STEPS, ddp=True)
    assert model.dist_lora.ddp is not None
    _assert_close(dl.adapter_state_dict(model), ref["final"], f"DDP after {STEPS} AdamW steps", tol=1e-4)


@check("tp1-ep2-etp2", "tp1-ep2")
def peft_adapter_imports_with_peft_logits(ctx):
    for name in SCENARIOS:
        ref = _ref(ctx, name)
        model = models.from_pretrained(ctx.data[SCENARIOS[name][0]])
        dl.import_peft(model, Path(ctx.tmp) / f"peft_{name}")
        assert rel_error(models.logits(model, ref["ids"]), ref["logits"]) <= TOL, name


@check("tp1-ep2-etp2", "tp2-ep2-sp")
def export_loads_in_peft_with_our_logits(ctx):
    import peft

    for name in SCENARIOS:
        ref = _ref(ctx, name)
        model = _model(ctx, name, ref["state"])
        out = Path(ctx.tmp) / f"export_{name}_{ctx.layout.name}"
        dl.export_peft(model, out)
        ours = models.logits(model, ref["ids"])
        if ctx.groups.rank == 0:
            base = hf_model(TINY_CONFIGS[SCENARIOS[name][0]])
            with torch.no_grad():
                theirs = peft.PeftModel.from_pretrained(base, out).eval()(ref["ids"]).logits
            assert rel_error(ours, theirs) <= TOL, name
        barrier()


@check("tp1-ep2-etp2", "tp1-pp2")
def merge_unmerge_and_merged_save_pretrained_match_peft(ctx):
    from transformers import AutoModelForCausalLM

    for name in ("mixtral", "qwen3_moe"):
        ref = _ref(ctx, name)
        model = _model(ctx, name, ref["state"])
        dl.merge_adapter(model)
        assert rel_error(models.logits(model, ref["ids"]), ref["merged"]) <= TOL, name
        dl.unmerge_adapter(model)
        assert rel_error(models.logits(model, ref["ids"]), ref["logits"]) <= TOL, name
        dl.merge_and_unload(model)
        out = Path(ctx.tmp) / f"merged_{name}_{ctx.layout.name}"
        models.save_pretrained(model, out)
        if ctx.groups.rank == 0:
            loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
            with torch.no_grad():
                assert rel_error(loaded(ref["ids"]).logits, ref["merged"]) <= TOL, name
        barrier()
    if ctx.layout.name != "tp1-ep2-etp2":
        return
    with on_every_rank("offline merged releases"):  # dist-lora merge, on rank 0 (none waits if it fails)
        if ctx.groups.rank == 0:
            for name in ("mixtral", "qwen3_moe"):
                fused = Path(ctx.tmp) / f"{name}_fused_base"  # transformers' fused [E, ...] expert format
                hf_model(TINY_CONFIGS[name]).save_pretrained(fused, save_original_format=False)
                for base in (ctx.data[name], fused):
                    out = merge_release(base, Path(ctx.tmp) / f"peft_{name}", Path(ctx.tmp) / f"release_{name}",
                                        overwrite=True, progress=False)
                    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
                    with torch.no_grad():
                        err = rel_error(loaded(_ref(ctx, name)["ids"]).logits, _ref(ctx, name)["merged"])
                    assert err <= TOL, (name, str(base), err)


@check("tp1-ep2-etp2", "tp2-ep2-sp", "tp1-pp2")
def sharded_checkpoints_reshard_across_ep_etp_tp_pp(ctx):
    """Saved once at EP2 x ETP2 (the first layout to run), loaded bit-exact at the others, as are
    its offline re-lay for TP2 and PEFT's files converted offline for TP2; a training checkpoint
    taken after one step there resumes here and lands on PEFT's step 3."""
    ref = _ref(ctx, "mixtral")
    adapter, training = Path(ctx.tmp) / "sharded_ep2_etp2", Path(ctx.tmp) / "training_ep2_etp2"
    offline = Path(ctx.tmp) / "sharded_offline_tp2"
    converted = Path(ctx.tmp) / "converted_from_peft_tp2"  # dist-lora convert of PEFT's own files
    if ctx.layout.name == "tp1-ep2-etp2":
        model = _model(ctx, "mixtral", ref["state"])
        dl.save_adapter(model, adapter)
        optimizer = _train(ctx, model, ref, 1)
        dl.save_training_state(model, optimizer, training, step=1)
        with on_every_rank("offline conversions"):  # a failure on rank 0 fails every rank (none waits)
            if ctx.groups.rank == 0:  # dist-lora convert: the experts are written whole (ETP = 1)
                reshard_checkpoint(adapter, offline, tp=2, pp=1)
                peft_to_sharded(Path(ctx.tmp) / "peft_mixtral", ctx.data["mixtral"], converted, tp=2, pp=1)
                saved, made = (json.loads((p / "manifest.json").read_text())["tensors"] for p in (adapter, converted))
                assert sorted(saved) == sorted(made), sorted(set(saved) ^ set(made))
                for key, meta in saved.items():  # what save_adapter writes, but for the files
                    differ = {k: (v, made[key].get(k)) for k, v in meta.items() if k != "files" and v != made[key].get(k)}
                    assert not differ, (key, differ)
        return
    for source in (adapter, offline, converted):
        model = models.from_pretrained(ctx.data["mixtral"])
        dl.load_adapter(model, source)
        _assert_close(dl.adapter_state_dict(model), ref["state"], f"resharded adapter from {source.name}", tol=0.0)
    model = models.from_pretrained(ctx.data["mixtral"])
    dl.load_adapter(model, training)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01,
                                  eps=ADAM_EPS)
    assert dl.load_training_state(model, optimizer, training)["step"] == 1
    ids, labels = _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"])
    for _ in range(STEPS - 1):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, ids, labels, num_microbatches=_microbatches(ctx))
        finalize_grads(model)
        optimizer.step()
    _assert_close(dl.adapter_state_dict(model), ref["final"], "resumed on another layout", tol=1e-4)


def _snapshot(model, ids) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "types": {n: type(m) for n, m in model.named_modules()},
            "logits": models.logits(model, ids), "adapters": dict(existing(model))}


def _fails_everywhere_unchanged(model, ids, action, needle):
    before = _snapshot(model, ids)
    with pytest.raises((RankError, ValueError)) as caught:
        action()
    messages = all_gather_object(str(caught.value))
    assert all(needle in m for m in messages), messages
    after = _snapshot(model, ids)
    assert after["types"] == before["types"] and after["adapters"] == before["adapters"]
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(p, before["params"][n]) for n, p in after["params"].items())
    assert torch.equal(after["logits"], before["logits"])


@check("tp1-ep2-etp2", "tp2-ep2-sp", "tp1-pp2", "tp1-pp2-ep2")
def router_aux_loss_matches_transformers(ctx):
    """config.json's output_router_logits turns the family's load-balancing loss on (pooled over
    the layers, summed over the sequence shards of TP), as in transformers: each micro-batch's as
    a single device computes it for that micro-batch. With PP (two micro-batches per replica) the
    counts of the other stage's layers come from the forward-only pass that precedes training."""
    micro = _microbatches(ctx)
    ref, aux = _ref(ctx, "mixtral"), torch.load(Path(ctx.tmp) / "ref_aux.pt")[ctx.groups.dp_size * micro]
    _, config = SCENARIOS["mixtral"]
    model = models.from_pretrained(ctx.data["mixtral_aux"])
    dl.apply_lora(model, dl.LoraConfig(**dict(config, init_lora_weights=False)))
    dl.set_adapter_state_dict(model, ref["state"])
    ids, labels = _my_rows(ctx, ref["ids"]), _my_rows(ctx, ref["labels"])
    loss = forward_backward(model, ids, labels, num_microbatches=micro)
    finalize_grads(model)
    assert abs(loss.item() - aux["loss"]) <= TOL * aux["loss"], (loss.item(), aux["loss"])
    _assert_close(dl.adapter_state_dict(model, gradients=True), aux["grads"], "gradients with the auxiliary loss")
    value = forward_backward(model, ids, labels, num_microbatches=micro, forward_only=True)
    assert abs(value.item() - aux["loss"]) <= TOL * aux["loss"], "the forward-only value"
    off = forward_backward(model, ids, labels, num_microbatches=micro, forward_only=True, router_aux_loss=False)
    assert abs(off.item() - ref["loss"].item()) <= TOL * ref["loss"].item()


@check("tp1-ep2-etp2")
def bad_expert_adapters_fail_on_every_rank_and_change_nothing(ctx):
    ref = _ref(ctx, "mixtral")
    model = models.from_pretrained(ctx.data["mixtral"])
    ids = ref["ids"]
    cases = [
        (dl.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS, use_dora=True),
         "use_dora=True is not supported on routed experts"),
        (dl.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"], target_parameters=EXPERTS),
         "AdaLoRA on routed experts"),
        (dl.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"]),
         "LoRA on the router is not supported"),
        (dl.LoraConfig(r=2, target_modules=["gate"]), "LoRA on the router is not supported"),
        (dl.LoraConfig(r=2, target_parameters=["mlp.experts.up_proj"]), "names no routed-expert parameter"),
        (dl.LoraConfig(r=2, target_parameters=EXPERTS, init_lora_weights="pissa"), "not supported on routed experts"),
    ]
    for config, needle in cases:
        adder = dl.apply_adalora if isinstance(config, dl.AdaLoraConfig) else dl.add_adapter
        _fails_everywhere_unchanged(model, ids, lambda: adder(model, config), needle)
    _fails_everywhere_unchanged(model, ids, lambda: dl.import_peft(model, Path(ctx.tmp) / "peft_eight_experts"),
                                "x 8 experts")
    eight = Path(ctx.tmp) / f"converted_eight_experts_{ctx.groups.rank}"  # offline: each rank on its own
    with pytest.raises(ValueError, match="x 8 experts"):
        peft_to_sharded(Path(ctx.tmp) / "peft_eight_experts", ctx.data["mixtral"], eight)
    assert not eight.exists()
    with pytest.raises(ValueError, match="lora_dropout=0.1 does not work with target_parameters"):
        dl.LoraConfig(r=2, target_parameters=EXPERTS, lora_dropout=0.1)


test_expert_lora_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)
