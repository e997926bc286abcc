"""PiSSA / pissa_niter_K / OLoRA / LoftQ at TP=2 (and PP=2) against single-device PEFT.

The parent runs PEFT on the unsharded HF model (float32): the initial adapter, the residual base
weights PEFT writes back, and the logits. Each worker loads the same checkpoint into Megatron,
applies the same ``LoraConfig`` and must reproduce all three: exact methods factor by factor up to
the sign of each rank-one component (one sign for A's row and B's column), the randomised SVD by
principal angles and reconstruction error, the base weights (gathered through
``models.save_pretrained`` after ``unload``) element-wise. Targets cover column layers (q/k/v rows
of the fused ``linear_qkv``, gate/up of ``linear_fc1``) and row layers (o_proj, down_proj).

The PiSSA / OLoRA adapters, after a perturbation standing for training, are exported with
``path_initial_model_for_weight_conversion`` and loaded by peft on the *original* base: its logits
must equal ours on the residual base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_lora import (
    LoraConfig,
    adapter_state_dict,
    add_adapter,
    apply_lora,
    export_peft,
    load_adapter,
    models,
    save_adapter,
    set_adapter_state_dict,
    unload,
)
from dist_lora.config import LoftQConfig
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import group_rank
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_init_reference import peft_init, residual_base
from dist_lora.testing.peft_reference import rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# hidden 128 / intermediate 256: every row-parallel shard at TP=2 is whole nf4 blocks of 64.
WIDE = dict(TINY_CONFIGS["llama"], hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2)
SCENARIOS = {  # name: (model, config, exact?)
    "pissa": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights="pissa",
                            rank_pattern={"down_proj": 6}), True),
    "olora": ("llama", dict(r=4, lora_alpha=16, target_modules=ALL, init_lora_weights="olora"), True),
    "loftq": ("wide", dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": 2}), True),
    "qwen2_pissa_rslora": ("qwen2", dict(r=2, lora_alpha=4, use_rslora=True, target_modules=ALL,
                                         init_lora_weights="pissa"), True),
    "pissa_niter": ("decay", dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights="pissa_niter_8"), False),
}
EXPORTED = ("pissa", "olora")
# A second adapter decomposes what the first one left in the base (as PEFT's add_adapter does).
FIRST = dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["k_proj", "gate_proj", "down_proj"])
SECOND = dict(r=2, lora_alpha=2, init_lora_weights="olora", target_modules=["k_proj", "gate_proj", "down_proj"])
TOL = 1e-4  # float64-Gram SVD / CholeskyQR against LAPACK float32 on the full matrix


def _planted_spectrum(model, seed: int = 3) -> None:
    """Give every projection singular values 2^-i (random singular vectors): a clear gap, so the
    randomised SVD converges and two runs with different sketches must agree."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ALL:
                m, n = module.weight.shape
                u = torch.linalg.qr(torch.randn(m, m, generator=g))[0][:, : min(m, n)]
                v = torch.linalg.qr(torch.randn(n, n, generator=g))[0][:, : min(m, n)]
                module.weight.copy_(u * 2.0 ** -torch.arange(min(m, n)).float() @ v.t())


def prepare(tmp: Path) -> dict:
    import peft
    from transformers import AutoModelForCausalLM

    data = {}
    for name, config in (("llama", TINY_CONFIGS["llama"]), ("decay", TINY_CONFIGS["llama"]), ("wide", WIDE),
                         ("qwen2", TINY_CONFIGS["qwen2"])):
        model = hf_model(config)
        if name == "decay":
            _planted_spectrum(model)
        model.save_pretrained(str(tmp / name))
        data[name] = str(tmp / name)
    vocab = min(c["vocab_size"] for c in TINY_CONFIGS.values())
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(5))
    for scenario, (family, config, _) in SCENARIOS.items():
        torch.manual_seed(0)  # PEFT's svd_lowrank draws from the global generator
        hf = AutoModelForCausalLM.from_pretrained(data[family], attn_implementation="eager").float().eval()
        ref = peft_init(hf, **config)
        state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(ref).items()}
        torch.save({"ids": ids, "state": state, "base": residual_base(ref), "logits": ref(ids).logits.detach()},
                   tmp / f"ref_{scenario}.pt")
    hf = AutoModelForCausalLM.from_pretrained(data["llama"], attn_implementation="eager").float().eval()
    ref = peft_init(hf, **FIRST)
    ref.add_adapter("second", peft.LoraConfig(**SECOND))
    second = peft.get_peft_model_state_dict(ref, adapter_name="second")
    torch.save({"state": {k: v.detach().clone() for k, v in second.items()}, "base": residual_base(ref)},
               tmp / "ref_second.pt")
    return data


def _ours(config: dict) -> LoraConfig:
    config = dict(config)
    if "loftq_config" in config:
        config["loftq_config"] = LoftQConfig(**config["loftq_config"])
    return LoraConfig(**config)


def _modules(state: dict) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k})


def _assert_exact_up_to_sign(ours: dict, ref: dict, what: str) -> None:
    assert sorted(ours) == sorted(ref), (what, sorted(set(ours) ^ set(ref)))
    for module in _modules(ref):
        a, b = ours[f"{module}.lora_A.weight"], ours[f"{module}.lora_B.weight"]
        ra, rb = ref[f"{module}.lora_A.weight"], ref[f"{module}.lora_B.weight"]
        sign = torch.sign((a * ra).sum(1))
        assert bool((sign != 0).all()), (what, module)
        err = max(rel_error(a * sign[:, None], ra), rel_error(b * sign, rb))
        assert err <= TOL, f"{what}: {module} factors differ by {err:.2e} (up to sign)"


def _sin_angle(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of x and y."""
    qx, qy = torch.linalg.qr(x.double())[0], torch.linalg.qr(y.double())[0]
    return torch.linalg.matrix_norm(qy - qx @ (qx.t() @ qy), ord=2).item()


def _assert_same_subspaces(ours: dict, ref: dict, what: str) -> None:
    assert sorted(ours) == sorted(ref), what
    for module in _modules(ref):
        for leaf, transpose in (("lora_A", True), ("lora_B", False)):
            x, y = ours[f"{module}.{leaf}.weight"], ref[f"{module}.{leaf}.weight"]
            if transpose:
                x, y = x.t(), y.t()
            sin = _sin_angle(x, y)
            assert sin <= 1e-3, f"{what}: {module}.{leaf} subspace angle sin {sin:.2e}"
        # the singular values (norms of the rank-one components) agree too
        norms = ours[f"{module}.lora_A.weight"].norm(dim=1)
        ref_norms = ref[f"{module}.lora_A.weight"].norm(dim=1)
        assert rel_error(norms, ref_norms) <= 1e-3, (what, module)


def _gathered_base(ctx, model, name: str) -> dict | None:
    from safetensors.torch import load_file

    out = Path(ctx.tmp) / f"base_{name}_{ctx.layout.name}"
    unload(model)
    models.save_pretrained(model, out)
    if group_rank() != 0:
        return None
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@check("tp2", "pp2")
def initialisation_and_residual_base_match_peft(ctx):
    for name, (family, config, exact) in SCENARIOS.items():
        ref = torch.load(Path(ctx.tmp) / f"ref_{name}.pt")
        model = models.from_pretrained(ctx.data[family])
        apply_lora(model, _ours(config))
        ours = adapter_state_dict(model)
        (_assert_exact_up_to_sign if exact else _assert_same_subspaces)(ours, ref["state"], name)
        logits = models.logits(model, ref["ids"])
        assert rel_error(logits, ref["logits"]) <= TOL, (name, rel_error(logits, ref["logits"]))
        base = _gathered_base(ctx, model, name)
        if base is not None:
            tied = {"lm_head.weight"} if TINY_CONFIGS.get(family, {}).get("tie_word_embeddings") else set()
            assert sorted(base) == sorted(set(ref["base"]) - tied), name  # a tied lm_head is not saved
            tol = TOL if exact else 1e-3
            worst = max(base, key=lambda k: rel_error(base[k], ref["base"][k]))
            assert rel_error(base[worst], ref["base"][worst]) <= tol, (name, worst, rel_error(base[worst], ref["base"][worst]))


@check("tp2")
def a_second_adapter_decomposes_the_residual_of_the_first_as_in_peft(ctx):
    ref = torch.load(Path(ctx.tmp) / "ref_second.pt")
    model = models.from_pretrained(ctx.data["llama"])
    apply_lora(model, LoraConfig(**FIRST))
    add_adapter(model, LoraConfig(**SECOND), "second")
    _assert_exact_up_to_sign(adapter_state_dict(model, "second"), ref["state"], "second adapter")
    base = _gathered_base(ctx, model, "second")
    if base is not None:
        assert max(rel_error(base[k], ref["base"][k]) for k in ref["base"]) <= TOL


@check("tp2")
def a_pissa_checkpoint_loaded_on_the_original_base_recreates_the_residual(ctx):
    family, config, _ = SCENARIOS["pissa"]
    ref = torch.load(Path(ctx.tmp) / "ref_pissa.pt")
    model = models.from_pretrained(ctx.data[family])
    apply_lora(model, _ours(config))
    g = torch.Generator().manual_seed(9)
    state = adapter_state_dict(model)
    set_adapter_state_dict(model, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sorted(state.items())})
    save_adapter(model, Path(ctx.tmp) / "pissa_ckpt")
    fresh = models.from_pretrained(ctx.data[family])  # the original base
    load_adapter(fresh, Path(ctx.tmp) / "pissa_ckpt")
    ours, theirs = models.logits(model, ref["ids"]), models.logits(fresh, ref["ids"])
    assert rel_error(theirs, ours) <= TOL, rel_error(theirs, ours)
    assert rel_error(ours, ref["logits"]) > 1e-2  # the perturbation matters


@check("tp2", "pp2")
def pissa_and_olora_export_as_lora_that_peft_loads_on_the_original_base(ctx):
    import peft
    from transformers import AutoModelForCausalLM

    for name in EXPORTED:
        family, config, _ = SCENARIOS[name]
        ref = torch.load(Path(ctx.tmp) / f"ref_{name}.pt")
        model = models.from_pretrained(ctx.data[family])
        apply_lora(model, _ours(config))
        initial = export_peft(model, Path(ctx.tmp) / f"init_{name}_{ctx.layout.name}")
        g = torch.Generator().manual_seed(7)  # stands for training: move every factor
        state = adapter_state_dict(model)
        set_adapter_state_dict(model, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sorted(state.items())})
        logits = models.logits(model, ref["ids"])
        out = export_peft(model, Path(ctx.tmp) / f"lora_{name}_{ctx.layout.name}",
                          path_initial_model_for_weight_conversion=initial)
        if group_rank() == 0:
            base = AutoModelForCausalLM.from_pretrained(ctx.data[family], attn_implementation="eager").float().eval()
            loaded = peft.PeftModel.from_pretrained(base, str(out))
            assert loaded.peft_config["default"].r == 2 * config["r"], name
            theirs = loaded(ref["ids"]).logits.detach()
            assert rel_error(logits, theirs) <= TOL, (name, rel_error(logits, theirs))
            # without the conversion the adapter is wrong on the original base: the check has teeth
            plain = peft.PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(ctx.data[family], attn_implementation="eager").float().eval(),
                str(initial))
            assert rel_error(plain(ref["ids"]).logits.detach(), ref["logits"]) > 1e-2, name


@check("tp2")
def bad_input_raises_on_every_rank_and_leaves_the_model_as_it_was(ctx):
    model = models.from_pretrained(ctx.data["llama"])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for config, words in ((dict(target_modules=["linear_qkv"], init_lora_weights="pissa"), "target the projections"),
                          (dict(target_modules=["q_proj", "embed_tokens"], init_lora_weights="olora"), "embedding"),
                          (dict(r=40, target_modules=["k_proj"], init_lora_weights="pissa"), "lower r"),
                          (dict(target_modules=["o_proj"], init_lora_weights="loftq",
                                loftq_config={"loftq_bits": 4}), "block size")):
        try:
            apply_lora(model, _ours(config))
        except (ValueError, RankError) as err:
            assert words in str(err), (words, str(err))
        else:
            raise AssertionError(f"{config} was accepted")
        after = dict(model.named_parameters())
        assert sorted(after) == sorted(before)
        assert all(torch.equal(after[k], before[k]) for k in before), config


test_weight_init_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
