"""Sharded AdaLoRA against single-device PEFT (AdaLoraModel + RankAllocator), in one 4-rank launch.

The parent trains PEFT's AdaLoRA on the tiny Llama for 10 steps (all seven projections; the budget
schedule: no masking up to ``tinit`` = step 2, cubic budget steps 3-6, final mask at step 7,
fixed pattern after). Each worker loads the same base into Megatron on its layout, applies the
same AdaLoRA config with PEFT's initial adapter, runs the same loop (forward/backward, orth
penalty, ``finalize_grads``, AdamW, ``update_and_allocate``) and must reproduce at every step the
loss (cross-entropy + orthogonality penalty), the rank pattern and the adapter, then export both
PEFT formats that peft loads with our logits. Layouts at world size 4: ``tp1`` = DP4,
``tp2`` = TP2 x DP2, ``tp2-sp`` = TP2 + SP x DP2, ``pp2`` = PP2 x DP2, ``tp2-pp2``.

Training checkpoints (same launch): a run saved at step k and resumed on a fresh model and
optimizer repeats the uninterrupted run bit for bit (losses, masks, rank pattern, allocator EMAs,
adapter) for k before any ``update_and_allocate``, in the middle of the budget schedule and after
the final pattern; the EMAs reshard to another layout; wrong checkpoints fail on every rank.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import (
    AdaLoraConfig,
    adapter_state_dict,
    apply_adalora,
    models,
    orth_reg_loss,
    set_adapter_state_dict,
    update_and_allocate,
)
from dist_lora.adalora.export import export_adalora
from dist_lora.adalora.shrink import shrink_to_rank_pattern
from dist_lora.adalora.state import state_tensors
from dist_lora.adapters.registry import require_adapter
from dist_lora.checkpoint.entries import entries
from dist_lora.checkpoint.sharded import ShardReader, read_manifest
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny
from tests.adalora.reference import ADAM_EPS, adalora_reference, shifted

BATCH, SEQ, STEPS, LR = 4, 8, 10, 1e-2
UNEVEN_STEPS = 8  # through the final mask (step 7) on the 3-layer Llama
CONFIG = dict(init_r=4, target_r=2, lora_alpha=8, tinit=2, tfinal=3, deltaT=1, total_step=STEPS,
              orth_reg_weight=0.5, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])


def _batch():
    g = torch.Generator().manual_seed(11)
    vocab = TINY_CONFIGS["llama"]["vocab_size"]
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    save_tiny(TINY_CONFIGS["llama_3_layers"], tmp / "llama_3_layers")
    ids, labels = _batch()
    uneven = adalora_reference(CONFIG, ids, labels, steps=UNEVEN_STEPS, lr=LR, family="llama_3_layers")
    torch.save({"ids": ids, "labels": labels, **uneven}, tmp / "ref_3_layers.pt")
    ref = adalora_reference(CONFIG, ids, labels, steps=STEPS, lr=LR)
    kept = [sum(map(sum, p.values())) if p else None for p in ref["patterns"]]
    # The scenario must cover every phase, else the comparison proves less than it claims.
    assert kept[:3] == [None] * 3 and kept[3] > kept[4] > kept[6] and kept[7:] == [28] * 3, kept
    torch.save({"ids": ids, "labels": labels, **ref}, tmp / "ref.pt")
    return {"llama": str(tmp / "llama"), "llama_3_layers": str(tmp / "llama_3_layers")}


def _mine(ctx, tensor):
    return tensor.chunk(ctx.groups.dp_size)[ctx.groups.dp_rank]


def _mean_over_dp(ctx, value: float) -> float:
    everyone = all_gather_object((ctx.groups.tp_rank, ctx.groups.pp_rank, value))
    mine = [v for tp, pp, v in everyone if tp == ctx.groups.tp_rank and pp == ctx.groups.pp_rank]
    return sum(mine) / len(mine)


def _model(ctx, ref):
    model = models.from_pretrained(ctx.data["llama"])
    apply_adalora(model, AdaLoraConfig(**CONFIG))
    set_adapter_state_dict(model, ref["state"])
    return model


def _step_loss(ctx, model, ids, labels):
    ce = forward_backward(model, ids, labels, num_microbatches=2 if ctx.groups.pp_size > 1 else 1)
    reg = orth_reg_loss(model)
    reg.backward()
    finalize_grads(model)
    return _mean_over_dp(ctx, ce.item()) + reg.item()


def _close(ours: dict, ref: dict, what: str, tol: float) -> None:
    assert sorted(ours) == sorted(ref), (what, sorted(set(ours) ^ set(ref)))
    worst = max(ref, key=lambda k: rel_error(ours[k], ref[k]))
    assert rel_error(ours[worst], ref[worst]) <= tol, f"{what}: {worst} relative error {rel_error(ours[worst], ref[worst]):.2e}"


@check("tp1", "tp2", "tp2-sp", "pp2", "tp2-pp2")
def masks_ranks_loss_and_exports_match_peft(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    model = _model(ctx, ref)
    ids, labels = _mine(ctx, ref["ids"]), _mine(ctx, shifted(ref["labels"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01,
                                  eps=ADAM_EPS)
    config = require_adapter(model, "default")
    for step in range(STEPS):
        loss = _step_loss(ctx, model, ids, labels)
        assert abs(loss - ref["losses"][step]) <= 1e-5 * ref["losses"][step], (step, loss, ref["losses"][step])
        if step == 0:
            _close(adapter_state_dict(model, gradients=True), ref["grads"], "gradients with the orth penalty", 1e-5)
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
        assert config.rank_pattern == ref["patterns"][step], f"step {step}: rank pattern differs from peft's"
        _close(adapter_state_dict(model), ref["states"][step], f"adapter after step {step}", 1e-4)
    logits = models.logits(model, ref["ids"])
    assert rel_error(logits, ref["final_logits"]) <= 1e-4
    ranks = shrink_to_rank_pattern(model)  # physically, on every shard: same logits
    stages = all_gather_object(sum(ranks.values()), ctx.groups.pp_group) if ctx.groups.pp_size > 1 else [sum(ranks.values())]
    assert sum(stages) == CONFIG["target_r"] * 14  # 7 projections x 2 layers, target_r each on average
    assert rel_error(models.logits(model, ref["ids"]), logits) <= 1e-6
    update_and_allocate(model, STEPS)  # past the schedule: the shrunk layers already hold the pattern
    out = Path(ctx.tmp) / ctx.layout.name
    for fmt in ("adalora", "lora"):
        export_adalora(model, out / fmt, format=fmt)
    if ctx.groups.rank == 0:
        import peft

        for fmt in ("adalora", "lora"):
            loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), str(out / fmt))
            assert type(loaded.peft_config["default"]).__name__ == ("AdaLoraConfig" if fmt == "adalora" else "LoraConfig")
            with torch.no_grad():
                theirs = loaded(input_ids=ref["ids"]).logits
            assert rel_error(theirs, logits) <= 1e-5, (fmt, rel_error(theirs, logits))


@check("pp2", "tp2-pp2")
def global_budget_over_uneven_pipeline_stages_matches_peft(ctx):
    """The 3-layer Llama on stages of 2 and 1 layers (14 and 7 adapted weights): one threshold
    over both stages gives PEFT's rank pattern at every step, and PEFT's losses and adapter."""
    ref = torch.load(Path(ctx.tmp) / "ref_3_layers.pt")
    model = models.from_pretrained(ctx.data["llama_3_layers"])
    assert len(model.decoder.layers) == (2 if ctx.groups.pp_rank == 0 else 1)
    apply_adalora(model, AdaLoraConfig(**CONFIG))
    set_adapter_state_dict(model, ref["state"])
    ids, labels = _mine(ctx, ref["ids"]), _mine(ctx, shifted(ref["labels"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01,
                                  eps=ADAM_EPS)
    config = require_adapter(model, "default")
    for step in range(UNEVEN_STEPS):
        loss = _step_loss(ctx, model, ids, labels)
        assert abs(loss - ref["losses"][step]) <= 1e-5 * ref["losses"][step], (step, loss, ref["losses"][step])
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
        assert config.rank_pattern == ref["patterns"][step], f"step {step}: rank pattern differs from peft's"
    _close(adapter_state_dict(model), ref["states"][-1], f"adapter after {UNEVEN_STEPS} steps", 1e-4)


@check("tp2-pp2")
def different_steps_on_ranks_fail_everywhere(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    model = _model(ctx, ref)
    with pytest.raises(RankError, match="same global_step"):
        update_and_allocate(model, 3 + ctx.groups.rank % 2)
    with pytest.raises(RankError, match="call it after backward"):
        update_and_allocate(model, 3)  # no backward yet
    assert require_adapter(model, "default").rank_pattern is None


@check("tp1")
def unaveraged_data_parallel_gradients_fail(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    model = _model(ctx, ref)
    forward_backward(model, _mine(ctx, ref["ids"]), _mine(ctx, shifted(ref["labels"])))  # no finalize_grads
    with pytest.raises(RankError, match="finalize_grads"):
        update_and_allocate(model, 3)


@check("tp2")
def fused_megatron_target_is_refused(ctx):
    model = models.from_pretrained(ctx.data["llama"])
    with pytest.raises(RankError, match="target the Hugging Face names"):
        apply_adalora(model, AdaLoraConfig(**dict(CONFIG, target_modules=["linear_qkv"])))


# Checkpoints of the resume checks: before the first update_and_allocate, in the middle of the
# budget schedule (cubic steps 3-6), and after the final pattern (step 7 = total_step - tfinal).
RESUME_AT = (0, 5, 8)


def _ema_digest(model) -> str:
    """Digest of this rank's allocator EMAs, in a fixed order ("" when it holds none)."""
    h = hashlib.sha256()
    for e in entries(model, "default"):
        for name, t in sorted(state_tensors(model, "default").get(e.param, {}).items()):
            h.update(f"{e.key}.{name}".encode() + t.detach().contiguous().numpy().tobytes())
    return h.hexdigest() if state_tensors(model, "default") else ""


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01,
                             eps=ADAM_EPS)


def _train(ctx, model, optimizer, ref, steps, save_to: Path | None = None) -> list:
    """One record per step (loss, rank pattern, EMA digest); saves before the steps in RESUME_AT."""
    ids, labels = _mine(ctx, ref["ids"]), _mine(ctx, shifted(ref["labels"]))
    out = []
    for step in steps:
        if save_to is not None and step in RESUME_AT:
            dl.save_training_state(model, optimizer, save_to / f"k{step}", step=step, data_position=step)
        loss = _step_loss(ctx, model, ids, labels)
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
        out.append((loss, require_adapter(model, "default").rank_pattern, _ema_digest(model)))
    return out


def _fresh(ctx):
    """Another initial adapter and a new optimizer: only a complete restore repeats the run."""
    torch.manual_seed(999)
    model = models.from_pretrained(ctx.data["llama"])
    apply_adalora(model, AdaLoraConfig(**CONFIG), seed=77)
    return model, _adamw(model)


def _straight(ctx, ref, save_to: Path | None = None):
    model = _model(ctx, ref)
    records = _train(ctx, model, _adamw(model), ref, range(STEPS), save_to)
    return model, records


def _same_adapter(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@check("tp2", "pp2")
def resumed_training_repeats_the_uninterrupted_run_bit_for_bit(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    root = Path(ctx.tmp) / f"resume_{ctx.layout.name}"
    model, straight = _straight(ctx, ref, save_to=root)
    final, pattern = adapter_state_dict(model), require_adapter(model, "default").rank_pattern
    for k in RESUME_AT:
        manifest = read_manifest(root / f"k{k}")
        has_emas = any(m["role"].startswith("adalora.") for m in manifest["tensors"].values())
        assert has_emas == (0 < k <= CONFIG["total_step"] - CONFIG["tfinal"]), (k, has_emas)
        saved = AdaLoraConfig.from_dict(manifest["adapter_config"])
        assert saved.rank_pattern == (straight[k - 1][1] if k else None) and saved.total_step == STEPS
        model, optimizer = _fresh(ctx)
        record = dl.load_training_state(model, optimizer, root / f"k{k}")
        assert require_adapter(model, "default").to_dict() == saved.to_dict()
        resumed = _train(ctx, model, optimizer, ref, range(record["data_position"], STEPS))
        for step, (ours, theirs) in enumerate(zip(resumed, straight[k:]), start=k):
            assert ours[0] == theirs[0], f"resumed at {k}: step {step} loss {ours[0]!r} != {theirs[0]!r}"
            assert ours[1] == theirs[1], f"resumed at {k}: step {step} rank pattern differs"
            assert ours[2] == theirs[2], f"resumed at {k}: step {step} allocator EMAs differ"
        assert _same_adapter(adapter_state_dict(model), final), f"resumed at {k}: final adapter differs"
        assert require_adapter(model, "default").rank_pattern == pattern
    if ctx.layout.tp == 2:  # the resumed adapter exports to a PEFT AdaLoRA adapter peft loads
        logits = models.logits(model, ref["ids"])
        export_adalora(model, root / "export", format="adalora")
        if ctx.groups.rank == 0:
            import peft

            loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), str(root / "export"))
            with torch.no_grad():
                assert rel_error(loaded(input_ids=ref["ids"]).logits, logits) <= 1e-5
    ctx.state["straight"] = straight


@check("pp2")
def allocator_state_reshards_from_tp2_to_pp2(ctx):
    """The mid-schedule checkpoint of TP2 x DP2 loads on PP2 x DP2: parameters, AdamW moments and
    EMAs equal the saved global tensors bit for bit, and the run goes on like PP2's own."""
    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    k, path = 5, Path(ctx.tmp) / "resume_tp2" / "k5"
    model, optimizer = _fresh(ctx)
    dl.load_training_state(model, optimizer, path)
    manifest = read_manifest(path)
    reader, seen = ShardReader(path, manifest), 0
    emas = state_tensors(model, "default")
    for e in entries(model, "default"):
        held = {"": e.param, **{f".optim.{n}": v for n, v in optimizer.state[e.param].items() if v.dim()},
                **{f".adalora.{n}": v for n, v in emas[e.param].items()}}
        assert len(held) == 5, (e.key, sorted(held))
        for suffix, tensor in held.items():
            assert torch.equal(tensor, reader.global_tensor(e.key + suffix)), e.key + suffix
            seen += 1
    assert seen == 5 * 3 * 7 * 2 // ctx.groups.pp_size  # 3 tensors x 7 projections x 2 layers, split over PP
    resumed = _train(ctx, model, optimizer, ref, range(k, STEPS))
    straight = ctx.state["straight"]  # this layout's uninterrupted run
    for step, (ours, theirs) in enumerate(zip(resumed, straight[k:]), start=k):
        assert abs(ours[0] - theirs[0]) <= 1e-5 * theirs[0], (step, ours[0], theirs[0])
        assert ours[1] == theirs[1], f"step {step}: rank pattern differs after resharding"


@check("tp2")
def without_the_allocator_state_the_resumed_run_differs(ctx):
    """The resume check would catch a lost allocator: emptying the EMAs after loading the
    mid-schedule checkpoint changes the EMAs, the masks and the losses."""
    from dist_lora.adalora.allocator import existing_state

    ref = torch.load(Path(ctx.tmp) / "ref.pt")
    model, optimizer = _fresh(ctx)
    dl.load_training_state(model, optimizer, Path(ctx.tmp) / "resume_tp2" / "k5")
    existing_state(model, "default").reset()
    resumed = _train(ctx, model, optimizer, ref, range(5, STEPS))
    straight = ctx.state["straight"][5:]
    assert resumed[0][2] != straight[0][2]
    assert [r[1] for r in resumed] != [r[1] for r in straight], "masks do not depend on the EMAs here"
    assert [r[0] for r in resumed] != [r[0] for r in straight]


@check("tp2")
def checkpoints_of_another_method_init_r_or_schedule_fail_everywhere(ctx):
    ada_ckpt = Path(ctx.tmp) / "resume_tp2" / "k5"
    lora = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(lora, dl.LoraConfig(r=4, target_modules=CONFIG["target_modules"]))
    lora_opt = _adamw(lora)
    lora_ckpt = Path(ctx.tmp) / "lora_tp2"
    dl.save_training_state(lora, lora_opt, lora_ckpt, step=1)
    ada, ada_opt = _fresh(ctx)
    small = models.from_pretrained(ctx.data["llama"])
    apply_adalora(small, AdaLoraConfig(**dict(CONFIG, init_r=3)))
    longer = models.from_pretrained(ctx.data["llama"])
    apply_adalora(longer, AdaLoraConfig(**dict(CONFIG, total_step=12)))
    cases = [(lora, lora_opt, ada_ckpt, "adapter is ADALORA but this model's adapter is LORA"),
             (ada, ada_opt, lora_ckpt, "adapter is LORA but this model's adapter is ADALORA"),
             (small, _adamw(small), ada_ckpt, "init_r=4 but this model's has init_r=3"),
             (longer, _adamw(longer), ada_ckpt, "schedule differs .*total_step: 10 vs 12")]
    for model, optimizer, path, message in cases:
        before, config = adapter_state_dict(model), require_adapter(model, "default").copy()
        loaders = [lambda: dl.load_training_state(model, optimizer, path)]
        if "schedule" not in message:
            loaders.append(lambda: dl.load_adapter(model, path))
        for load in loaders:
            with pytest.raises(RankError, match=message):
                load()
            assert _same_adapter(adapter_state_dict(model), before) and require_adapter(model, "default") == config
            assert not optimizer.state
    assert all_gather_object("alive") == ["alive"] * ctx.world_size


test_adalora_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)
