"""EVA on sharded models against PEFT's EVA on the unsharded Hugging Face model, in one 2-rank launch.

The parent runs ``peft.get_eva_state_dict`` / ``initialize_lora_eva_weights`` on the tiny Llama
with the whole dataset (the single-process oracle). Workers load the same base into Megatron:
``tp2`` (column and row layers, fused q/k/v and gate/up), ``tp2-sp`` (sequence-sharded column
inputs) and ``pp2`` read the whole dataset; ``tp1`` at world size 2 is DP=2, each rank reading
one half of every batch (rows), so together they see exactly PEFT's batches. Components are
compared by the principal angles between the subspaces and row by row (signs included: both
use sklearn's sign rule); ranks, ``rank_pattern``, ``alpha_pattern`` and ``target_modules``
must be equal. With ``whiten=True`` PEFT divides rows shared by q/k/v (gate/up) by sqrt(S)
more than once (an in-place bug, see ``_peft_whitening_count``); dist_lora whitens once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.layers.adapter_layer import AdapterLayer
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

# Four layers: "all-linear" adapts 28 modules, so PEFT condenses target_modules to suffixes (>= 20).
LLAMA = dict(TINY_CONFIGS["llama"], num_hidden_layers=4)
SCENARIOS = {
    "all_linear": (dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="eva"),
                   dict(rho=2.0, tau=0.99)),
    # three down_proj layers get rank 0 (they leave target_modules), v_proj and q_proj share a
    # PCA, and whitening scales each component by 1/sqrt(singular value).
    "zero_rank_whiten": (dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                              init_lora_weights="eva"), dict(rho=4.0, tau=0.99, whiten=True)),
}
MIN_COS = 0.999  # smallest cosine of the principal angles between our and PEFT's subspaces


def _batches(n: int = 6, batch: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, LLAMA["vocab_size"], (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, 12:] = 0  # right padding
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt the label mask leaves out
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def prepare(tmp: Path) -> dict:
    import peft

    save_tiny(LLAMA, tmp / "llama")
    batches = _batches()
    for name, (config, eva) in SCENARIOS.items():
        model = peft.get_peft_model(hf_model(LLAMA),
                                    peft.LoraConfig(**config, eva_config=peft.EvaConfig(**eva)))
        state = {k.removeprefix("base_model.model."): v.clone() for k, v in
                 peft.get_eva_state_dict(model, batches, show_progress_bar=False).items()}
        peft.initialize_lora_eva_weights(model, eva_state_dict={f"base_model.model.{k}": v.clone()
                                                                for k, v in state.items()})
        cfg = model.peft_config["default"]
        adapter = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
        torch.save({"batches": batches, "eva": state, "adapter": adapter, "rank_pattern": dict(cfg.rank_pattern),
                    "alpha_pattern": dict(cfg.alpha_pattern), "target_modules": sorted(cfg.target_modules)},
                   tmp / f"ref_{name}.pt")
    return {"llama": str(tmp / "llama")}


def _ref(ctx, scenario):
    return torch.load(Path(ctx.tmp) / f"ref_{scenario}.pt")


def _model(ctx, scenario="all_linear", first_stage_layers=None):
    config, eva = SCENARIOS[scenario]
    model = models.from_pretrained(ctx.data["llama"], first_stage_layers=first_stage_layers)
    dl.apply_lora(model, dl.LoraConfig(**config, eva_config=dl.EvaConfig(**eva)))
    return model


def _my_batches(ctx, batches):
    """Data-parallel rank i reads the i-th contiguous part (rows) of every batch."""
    g = ctx.groups
    return [{k: v.chunk(g.dp_size)[g.dp_rank] for k, v in b.items()} for b in batches]


def _full(ctx, model, state: dict) -> dict:
    """Global [r, in] tensors from this rank's shards (gathered over TP, merged over PP)."""
    from dist_lora.adapters.registry import adapter_layers

    layouts = {f.slot.hf_names[0]: f.a_layout for _, layer in adapter_layers(model)
               for f in layer.factors_of("default").values()}
    shards = all_gather_object((ctx.groups.pp_rank, ctx.groups.tp_rank, state))
    out = {}
    for name in {n for _, _, s in shards for n in s}:
        by_tp = {tp: s[name] for _, tp, s in shards if name in s}
        parts = [by_tp[tp] for tp in sorted(by_tp)]
        out[name] = layouts[name].gather(parts) if name in layouts else parts[0]
    return out


SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _peft_whitening_count(name: str, ref: dict) -> torch.Tensor:
    """How often PEFT divides each row of ``name`` by sqrt(S) when ``whiten=True``.

    PEFT bug: ``u = components_[:rank]; u /= S.sqrt()`` divides *in place*, and layers that share
    an input (q/k/v, gate/up) share one PCA, so row i is divided once per group member whose
    rank exceeds i, and every member returns that same storage. dist_lora whitens once per layer
    (the EVA paper's definition); this reproduces PEFT's count so the rest is still compared."""
    group = next((g for g in SHARED_INPUT if any(name.endswith(f".{p}") for p in g)), None)
    if group is None:
        return torch.ones(ref[name].shape[0])
    stem = name.rsplit(".", 1)[0]
    ranks = [ref[f"{stem}.{p}"].shape[0] for p in group if f"{stem}.{p}" in ref]
    return torch.tensor([float(sum(r > i for r in ranks)) for i in range(ref[name].shape[0])])


def _assert_same_subspaces(ours: dict, ref: dict, whiten: bool = False):
    assert sorted(ours) == sorted(ref), sorted(set(ours) ^ set(ref))
    ranks = {k: (ours[k].shape[0], ref[k].shape[0]) for k in ref}
    assert all(a == b for a, b in ranks.values()), f"ranks differ: {ranks}"
    for name, v in ref.items():
        if v.shape[0] == 0:
            continue
        o = ours[name].double()
        q1, q2 = torch.linalg.qr(v.double().T)[0], torch.linalg.qr(o.T)[0]
        cos = torch.linalg.svdvals(q1.T @ q2).min().item()
        assert cos >= MIN_COS, f"{name}: principal angle cosine {cos:.6f} < {MIN_COS}"
        rowwise = torch.nn.functional.cosine_similarity(o, v.double(), dim=1).min().item()
        assert rowwise >= 0.99, f"{name}: a component differs from PEFT's (cosine {rowwise:.6f})"
        ours_norm, ref_norm = o.norm(dim=1), v.double().norm(dim=1)  # 1, or 1/sqrt(S) when whitened
        if whiten:
            short = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            refs = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): t for k, t in ref.items()}
            ours_norm = ours_norm ** _peft_whitening_count(short, refs).double()
        assert torch.allclose(ours_norm, ref_norm, rtol=1e-3), f"{name}: row norms {ours_norm} vs PEFT {ref_norm}"


@check("tp1", "tp2", "tp2-sp", "pp2")
def eva_state_dict_matches_peft(ctx):
    for scenario in SCENARIOS:
        ref = _ref(ctx, scenario)
        model = _model(ctx, scenario)
        ours = dl.get_eva_state_dict(model, _my_batches(ctx, ref["batches"]))
        _assert_same_subspaces(_full(ctx, model, ours), ref["eva"], SCENARIOS[scenario][1].get("whiten", False))


@check("tp1", "tp2", "tp2-sp")
def initialize_lora_eva_weights_matches_peft(ctx):
    for scenario in SCENARIOS:
        _initialize_matches_peft(ctx, scenario)


@check("pp2")
def eva_on_uneven_pipeline_stages_matches_peft(ctx):
    """Stages of 3 and 1 layers: the sketches, the rank redistribution over all stages and the
    initialised adapter are PEFT's."""
    for scenario in SCENARIOS:
        ref = _ref(ctx, scenario)
        model = _model(ctx, scenario, first_stage_layers=3)
        assert len(model.decoder.layers) == (3 if ctx.groups.pp_rank == 0 else 1)
        ours = dl.get_eva_state_dict(model, _my_batches(ctx, ref["batches"]))
        _assert_same_subspaces(_full(ctx, model, ours), ref["eva"], SCENARIOS[scenario][1].get("whiten", False))
    _initialize_matches_peft(ctx, "zero_rank_whiten", first_stage_layers=3)


def _initialize_matches_peft(ctx, scenario, first_stage_layers=None):
    ref = _ref(ctx, scenario)
    model = _model(ctx, scenario, first_stage_layers)
    base = models.logits(model, ref["batches"][0]["input_ids"])
    dl.initialize_lora_eva_weights(model, _my_batches(ctx, ref["batches"]))
    from dist_lora.adapters.registry import registry

    config = registry(model).configs["default"]
    assert config.rank_pattern == ref["rank_pattern"], (config.rank_pattern, ref["rank_pattern"])
    assert config.alpha_pattern == pytest.approx(ref["alpha_pattern"]), (config.alpha_pattern, ref["alpha_pattern"])
    kept = {n for n, v in ref["eva"].items() if v.shape[0] > 0}
    assert _selected(config.target_modules, ref["eva"]) == kept, (scenario, config.target_modules)
    if scenario == "all_linear":
        # PEFT bug: from 20 modules on it condenses target_modules to suffixes, but leaves the
        # layers it just dropped (rank 0) out of the names those suffixes must avoid, so its
        # "down_proj" re-targets them. dist_lora's condensed list avoids them.
        assert _selected(ref["target_modules"], ref["eva"]) > kept
        assert config.target_modules != ref["target_modules"]
    else:
        assert sorted(config.target_modules) == ref["target_modules"]
    state = dl.adapter_state_dict(model)
    expected = {k: v for k, v in ref["adapter"].items()}
    assert sorted(state) == sorted(expected), sorted(set(state) ^ set(expected))
    a_ours = {k: v for k, v in state.items() if k.endswith("lora_A.weight")}
    a_ref = {k: v for k, v in expected.items() if k.endswith("lora_A.weight")}
    _assert_same_subspaces(a_ours, a_ref, SCENARIOS[scenario][1].get("whiten", False))
    for key in state:
        if key.endswith("lora_B.weight"):
            assert state[key].shape == expected[key].shape and not state[key].any(), key
    if ctx.layout.name == "tp2":  # the release loads in PEFT with the new ranks and alphas
        import peft

        out = dl.export_peft(model, Path(ctx.tmp) / f"eva_{scenario}", overwrite=True)
        released = peft.get_peft_model_state_dict(peft.PeftModel.from_pretrained(hf_model(LLAMA), str(out)))
        assert sorted(released) == sorted(state) and all(torch.equal(released[k], state[k]) for k in state)
    # B = 0: the initialised adapter leaves the model's output unchanged, and it trains.
    assert torch.allclose(models.logits(model, ref["batches"][0]["input_ids"]), base, atol=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora." in n)


def _selected(targets: list[str], layers: dict) -> set[str]:
    """The layers a target_modules list (exact names or dotted suffixes) selects."""
    return {n for n in layers if any(n == t or n.endswith("." + t) for t in targets)}


def _unchanged(model, before_state, before_config):
    from dist_lora.adapters.registry import registry

    after = dl.adapter_state_dict(model)
    assert sorted(after) == sorted(before_state)
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert registry(model).configs["default"].to_dict() == before_config
    hooks = [m for m in model.modules() if isinstance(m, AdapterLayer) and m._forward_pre_hooks]
    assert not hooks, "EVA left hooks behind"
    assert not registry(model).disabled


@check("tp1", "tp2")
def bad_input_fails_on_every_rank_and_leaves_the_model(ctx):
    from dist_lora.adapters.registry import registry

    ref = _ref(ctx, "all_linear")
    model = _model(ctx)
    before, config = dl.adapter_state_dict(model), registry(model).configs["default"].to_dict()
    batches = _my_batches(ctx, ref["batches"])
    masked = [dict(b, labels=torch.full_like(b["labels"], -100)) for b in batches[:2]]
    uneven = batches[:2] if ctx.groups.dp_rank == 0 else batches[:3]
    left_pad = [dict(b, attention_mask=b["attention_mask"].flip(1)) for b in batches]
    cases = {"empty": ([], "empty"), "only masked tokens": (masked, "padding / label-masked"),
             "left padding": (left_pad, "right padding")}
    if ctx.groups.dp_size > 1:
        cases["unequal batches"] = (uneven, "different numbers of EVA batches")
    for what, (loader, message) in cases.items():
        with pytest.raises((ValueError, RankError)) as info:
            dl.initialize_lora_eva_weights(model, loader)
        assert message in str(info.value), (what, str(info.value))
        _unchanged(model, before, config)
    with pytest.raises(ValueError, match="rho"):
        dl.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="rho"):
        dl.LoraConfig(**SCENARIOS["all_linear"][0], eva_config={"rho": 0.9})
    with pytest.raises((ValueError, RankError), match="eva_state_dict"):
        dl.initialize_lora_eva_weights(model)
    wrong = {"model.layers.0.self_attn.q_proj": torch.zeros(3, 7)}
    with pytest.raises((ValueError, RankError), match="does not fit lora_A"):
        dl.initialize_lora_eva_weights(model, eva_state_dict=wrong)
    _unchanged(model, before, config)


test_eva_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
