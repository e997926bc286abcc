"""``add_weighted_adapter`` on sharded Megatron models against PEFT's ``add_weighted_adapter`` on
the unsharded HF model, every combination type. One 4-rank launch: ``tp2`` (TP2 x DP2),
``tp4`` and ``tp2-pp2``.

Two adapters cover per-projection slots of the fused q/k/v and gate/up layers, column
(``v_proj``, ``up_proj``) and row (``o_proj``, ``down_proj``) layers, the vocab-parallel embedding
and the (padded, vocabulary 101) output layer; the second adapter covers only some modules, so
modules with one source are combined too. What is compared, per type:

* ``linear``, ``cat``, ``ties``, ``magnitude_prune``: every factor equals PEFT's (1e-5).
* ``svd`` types: every factor equals PEFT's after signing each of PEFT's singular pairs by our
  layout-independent convention (LAPACK's signs are arbitrary), and ``B A`` equals PEFT's.
* ``svd_clamp``: PEFT's clamp is not invariant to those signs, so the expected result is PEFT's
  formula (``torch.quantile`` of ``cat(U S, Vh)`` on one process) applied to PEFT's unclamped
  factors signed that way; our quantile is computed from shards.
* DARE types: PEFT draws the masks with torch's global RNG. The reference replaces only that
  draw (``merge_utils.random_pruning``) by our seeded global mask for the same module / tensor /
  adapter (``task_arithmetic.dare_mask``), so everything else -- rescaling, sign election,
  disjoint merge, the SVD -- is PEFT's own code. ``check_replicas`` then proves the replicated
  factors (hence the masks) are identical on every TP rank and DP replica.
* ``cat`` and ``svd`` adapters are activated and give PEFT's logits; the ``svd`` one, exported,
  loads with ``peft.PeftModel.from_pretrained`` and gives them too.
* bad input raises on every rank and leaves the model as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_lora as dl
from dist_lora import models
from dist_lora.adapters.registry import adapter_layers, registry
from dist_lora.parallel.collectives import barrier
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny
from tests.combine.peft_helpers import pairs, peft_with_our_dare_masks, signed

SEED = 1234
WEIGHTS = [0.7, -1.3]
CONFIGS = {
    "one": dict(r=4, lora_alpha=8, init_lora_weights=False,
                target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj",
                                "embed_tokens", "lm_head"]),
    "two": dict(r=4, lora_alpha=4, init_lora_weights=False,
                target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]),
}
CASES = {
    "linear": dict(combination_type="linear"),
    "cat": dict(combination_type="cat"),
    "svd": dict(combination_type="svd", svd_rank=3),
    "svd_clamp": dict(combination_type="svd", svd_rank=3, svd_clamp=0.8),
    "ties": dict(combination_type="ties", density=0.5),
    "ties_svd": dict(combination_type="ties_svd", density=0.5, majority_sign_method="frequency"),
    "magnitude_prune": dict(combination_type="magnitude_prune", density=0.3),
    "magnitude_prune_svd": dict(combination_type="magnitude_prune_svd", density=0.6),
    "dare_linear": dict(combination_type="dare_linear", density=0.5),
    "dare_ties": dict(combination_type="dare_ties", density=0.5),
    "dare_linear_svd": dict(combination_type="dare_linear_svd", density=0.5),
    "dare_ties_svd": dict(combination_type="dare_ties_svd", density=0.5, majority_sign_method="frequency"),
}
LOGIT_CASES = ("cat", "svd")
# One adapter over the whole fused Megatron layer = PEFT adapters on q/k/v (gate/up) sharing one A.
FUSED_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
FUSED_CASES = ("linear", "cat")


def _ids():
    return torch.randint(0, TINY_CONFIGS["llama"]["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))


def _tie_fused_a(state: dict) -> dict:
    state = dict(state)
    for layer in range(TINY_CONFIGS["llama"]["num_hidden_layers"]):
        for part, group in FUSED_GROUPS:
            keys = [f"base_model.model.model.layers.{layer}.{part}.{p}.lora_A.weight" for p in group]
            for key in keys[1:]:
                state[key] = state[keys[0]].clone()
    return state


def _fused_reference() -> dict:
    import peft

    from dist_lora.testing.peft_reference import peft_model

    model = peft_model("llama", dict(CONFIGS["one"], target_modules=FUSED_TARGETS))
    model.add_adapter("two", peft.LoraConfig(**dict(CONFIGS["two"], target_modules=FUSED_TARGETS)))
    states = {}
    for ours, theirs in (("one", "default"), ("two", "two")):
        states[ours] = _tie_fused_a(peft.get_peft_model_state_dict(model, adapter_name=theirs))
        peft.set_peft_model_state_dict(model, states[ours], adapter_name=theirs)
    combined = {}
    for name in FUSED_CASES:
        model.base_model.add_weighted_adapter(["default", "two"], WEIGHTS, name, **CASES[name])
        combined[name] = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model, adapter_name=name).items()}
    return {"states": states, "combined": combined}


def prepare(tmp: Path) -> dict:
    import peft

    from dist_lora.testing.peft_reference import peft_model

    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    model = peft_model("llama", CONFIGS["one"])  # adapter "default" = "one"
    model.add_adapter("two", peft.LoraConfig(**CONFIGS["two"]))
    states = {"one": peft.get_peft_model_state_dict(model, adapter_name="default"),
              "two": peft.get_peft_model_state_dict(model, adapter_name="two")}
    ids, out, logits = _ids(), {}, {}
    for name, kwargs in CASES.items():
        patches = peft_with_our_dare_masks(model, name, SEED) if "dare" in name else []
        for p in patches:
            p.start()
        try:
            model.base_model.add_weighted_adapter(["default", "two"], WEIGHTS, name, **kwargs)
        finally:
            for p in patches:
                p.stop()
        out[name] = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model, adapter_name=name).items()
                     if not k.endswith("base_layer.weight")}
        if name in LOGIT_CASES:
            model.set_adapter(name)
            with torch.no_grad():
                logits[name] = model(ids).logits
    torch.save({"ids": ids, "states": states, "combined": out, "logits": logits, "fused": _fused_reference()},
               tmp / "refs.pt")
    return {"llama": str(tmp / "llama")}


def _model(ctx, refs):
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(**CONFIGS["one"]), "one")
    dl.add_adapter(model, dl.LoraConfig(**CONFIGS["two"]), "two")
    for name in ("one", "two"):
        dl.set_adapter_state_dict(model, refs["states"][name], name)
    return model


def _assert_close(ours: dict, ref: dict, what: str, tol: float = 1e-5):
    assert sorted(ours) == sorted(ref), (what, sorted(set(ours) ^ set(ref)))
    worst = max(ref, key=lambda k: rel_error(ours[k], ref[k]))
    assert rel_error(ours[worst], ref[worst]) <= tol, f"{what}: {worst} relative error {rel_error(ours[worst], ref[worst]):.2e}"


def _products(state: dict) -> dict:
    return {a: state[b] @ state[a] for a, b in pairs(state)}


def _clamped(ref: dict, q: float) -> dict:
    """PEFT's clamp (``_svd_generalized_task_arithmetic_weighted_adapter``) applied per module."""
    out = dict(ref)
    for a, b in pairs(ref):
        high = torch.quantile(torch.cat([ref[b].flatten(), ref[a].flatten()]), q)
        out[a], out[b] = ref[a].clamp(-high, high), ref[b].clamp(-high, high)
    return out


@check("tp2", "tp4", "tp2-pp2")
def every_combination_type_equals_peft(ctx):
    refs = torch.load(Path(ctx.tmp) / "refs.pt")
    model = _model(ctx, refs)
    ours = {}
    for name, kwargs in CASES.items():
        dl.add_weighted_adapter(model, ["one", "two"], WEIGHTS, name, seed=SEED, **kwargs)
        ours[name] = dl.adapter_state_dict(model, name)
        ref = refs["combined"][name]
        if name == "svd_clamp":
            # PEFT's unclamped factors (same rank), signs aligned with ours, then PEFT's clamp.
            expected = _clamped(signed(refs["combined"]["svd"]), CASES[name]["svd_clamp"])
            _assert_close(ours[name], expected, name, tol=1e-4)
        elif kwargs["combination_type"].endswith("svd"):
            _assert_close(ours[name], signed(ref), name, tol=1e-4)
            # a truncated float32 LAPACK SVD (PEFT) against ours (float64 Gram): rounding ~1e-5
            _assert_close(_products(ours[name]), _products(ref), f"{name} B A", tol=5e-5)
        else:
            _assert_close(ours[name], ref, name)
        assert registry(model).configs[name].r == ({"cat": 8}.get(name) or CASES[name].get("svd_rank") or 4)
    dl.check_replicas(model)
    for name in LOGIT_CASES:
        dl.set_adapter(model, name)
        assert rel_error(models.logits(model, refs["ids"]), refs["logits"][name]) <= 1e-5, name
    if ctx.layout.name == "tp2-pp2":  # the combined config and tensors are a valid PEFT adapter
        out = Path(ctx.tmp) / "export"
        dl.export_peft(model, out, adapter_name="svd")
        if ctx.groups.rank == 0:
            import peft

            from dist_lora.testing.tiny import hf_model

            loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), out / "svd").eval()
            with torch.no_grad():
                assert rel_error(loaded(refs["ids"]).logits, refs["logits"]["svd"]) <= 1e-5
        barrier()


@check("tp2", "tp2-pp2")
def fused_layer_adapters_combine_like_peft_projections_sharing_a(ctx):
    refs = torch.load(Path(ctx.tmp) / "refs.pt")["fused"]
    model = models.from_pretrained(ctx.data["llama"])
    for name in ("one", "two"):
        config = dict(CONFIGS[name], target_modules=["linear_qkv", "linear_fc1"])
        dl.add_adapter(model, dl.LoraConfig(**config), name)
        dl.set_adapter_state_dict(model, refs["states"][name], name)
    for name in FUSED_CASES:
        dl.add_weighted_adapter(model, ["one", "two"], WEIGHTS, name, **CASES[name])
        _assert_close(dl.adapter_state_dict(model, name), refs["combined"][name], f"fused {name}")
    for kind in ("svd", "ties", "dare_linear"):  # each projection would get its own A
        with pytest.raises(Exception, match="fused adapter"):
            dl.add_weighted_adapter(model, ["one", "two"], WEIGHTS, "new", combination_type=kind, density=0.5)
        assert "new" not in registry(model).configs


@check("tp2", "tp4")
def order_statistics_of_sharded_tensors_equal_torch_on_the_whole_tensor(ctx):
    from dist_lora.combine.order_stats import kth_largest_keys, quantile, real_part, value_at_key
    from dist_lora.layers.sharding import FactorLayout

    tp, rank, group = ctx.groups.tp_size, ctx.groups.tp_rank, ctx.groups.tp_group
    g = torch.Generator().manual_seed(5)
    for dtype, scale in ((torch.float32, 1.0), (torch.float64, 1e300)):
        full = torch.randn(13, 20, generator=g, dtype=dtype) * scale
        full[0, :3] = 0.0  # zeros (and -0.0) are ordinary values
        full[1, 0] = -0.0
        other = torch.randn(7, 5, generator=g, dtype=dtype)  # a replicated part of the same query
        for layout in (FactorLayout(dim=1, size=20, padded=20 + (-20) % tp), FactorLayout(dim=0, size=13,
                                                                                          padded=13 + (-13) % tp)):
            local = real_part(layout.local(full, tp, rank), layout, tp, rank)
            parts = [(local, True), (other, False)]
            values = torch.cat([full.flatten(), other.flatten()])
            for k in (1, 17, values.numel()):
                key = kth_largest_keys([parts], [k], group)[0]
                assert value_at_key(parts, key, group) == torch.topk(values, k).values[-1], (dtype, k)
            for q in (0.0, 0.37, 0.8, 1.0):
                expected = torch.quantile(values.float() if dtype == torch.float32 else values, q)
                torch.testing.assert_close(quantile(parts, q, dtype, group), expected, rtol=1e-6, atol=0)


BAD_INPUT = [
    (dict(adapters=["one", "two"], weights=[1, 1], combination_type="ties"), "needs density"),
    (dict(adapters=["one", "two"], weights=[1, 1], combination_type="dare_linear_svd"), "needs density"),
    (dict(adapters=["one", "nope"], weights=[1, 1]), "do not exist"),
    (dict(adapters=["one", "two"], weights=[1]), "one number per adapter"),
    (dict(adapters=["one", "small"], weights=[1, 1], combination_type="linear"), "equal rank"),
    (dict(adapters=["one", "regex"], weights=[1, 1], combination_type="cat"), "same way"),
    (dict(adapters=["one", "two"], weights=[1, 1], combination_type="average"), "unknown"),
    (dict(adapters=["one", "two"], weights=[1, 1], combination_type="ties", density=1.5), "density must be"),
    (dict(adapters=["one", "two"], weights=[1, 1], svd_clamp=2), "svd_clamp"),
]


@check("tp2-pp2")
def bad_input_raises_on_every_rank_and_leaves_the_model(ctx):
    refs = torch.load(Path(ctx.tmp) / "refs.pt")
    model = _model(ctx, refs)
    dl.add_adapter(model, dl.LoraConfig(r=2, target_modules=["q_proj"]), "small")
    dl.add_adapter(model, dl.LoraConfig(r=4, target_modules=r".*\.o_proj"), "regex")
    before = {a: dl.adapter_state_dict(model, a) for a in ("one", "two")}
    configs = dict(registry(model).configs)
    for kwargs, message in BAD_INPUT:
        with pytest.raises(Exception, match=message):
            dl.add_weighted_adapter(model, adapter_name="new", **kwargs)
        assert registry(model).configs == configs
        assert not any("new" in layer.adapter_names() for _, layer in adapter_layers(model))
    with pytest.raises(Exception, match="already exists"):
        dl.add_weighted_adapter(model, ["one", "two"], [1, 1], "two", combination_type="cat")
    for a in ("one", "two"):
        _assert_close(dl.adapter_state_dict(model, a), before[a], f"{a} unchanged", tol=0)


test_weighted_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)
