"""Adapters at the cost floor, in one 2-rank launch.

* Collectives per training step, counted through torch.distributed (every ``c10d`` operator,
  forward, backward and ``finalize_grads``): an adapted model runs exactly the frozen base's
  collectives in forward and backward, with and without SP, for LoRA, DoRA (also with dropout),
  per-projection and fused adapters on q/k/v/o/gate/up/down, lora_bias, the word embedding and
  lm_head (own or tied weight); per step it adds one
  bucketed all-reduce of the partial-sum gradients in ``finalize_grads`` (however many layers and
  micro-batches) and, with DoRA on row layers, one all-reduce of the stage's squared norms.
* DoRA's weight norm is computed once per optimizer step (two micro-batches, TP / SP / PP) and
  equals PEFT's after every AdamW step; outside ``forward_backward`` the logits follow a changed
  adapter (``set_adapter_state_dict``).
"""

from __future__ import annotations

from pathlib import Path

import torch

import dist_lora.layers.dora as dora
from dist_lora import LoraConfig, adapter_state_dict, apply_lora, models, set_adapter_state_dict
from dist_lora.adapters.registry import adapter_layers
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.parallel.collectives import all_gather_tensors
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.collective_count import count_collectives
from dist_lora.testing.peft_reference import loss_of, peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, save_tiny

BATCH, SEQ, MICRO, STEPS, LR, ADAM_EPS = 4, 8, 2, 3, 1e-2, 1e-6

COUNTED = {
    "lora_all_linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "dora_all_linear": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")),
    "dora_dropout": ("llama", dict(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.1, target_modules="all-linear")),
    "fused": ("llama", dict(r=4, lora_alpha=8, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])),
    "qwen_lora_bias": ("qwen2", dict(r=4, lora_alpha=8, lora_bias=True,
                                     target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])),
    "embedding_and_lm_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "v_proj"])),
    "qwen_tied_lm_head": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])),
}
DORA = dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", init_lora_weights=False)


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def _peft_norms(model) -> dict[str, torch.Tensor]:
    """PEFT's DoRA weight norm of every adapted module, by HF module name."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_magnitude_vector:
            continue
        weight = module.get_base_layer().weight
        lora_weight = module.lora_B["default"].weight @ module.lora_A["default"].weight
        out[name.removeprefix("base_model.model.")] = module.lora_magnitude_vector["default"].get_weight_norm(
            weight, lora_weight.detach(), module.scaling["default"]).detach().clone()
    return out


def dora_reference(ids, labels) -> dict:
    """PEFT DoRA, 3 AdamW steps of 2 accumulated micro-batches; norms before each step."""
    import peft

    model = peft_model("llama", DORA)
    state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, eps=ADAM_EPS)
    norms = []
    for _ in range(STEPS):
        norms.append(_peft_norms(model))
        optimizer.zero_grad()
        for mb_ids, mb_labels in zip(ids.chunk(MICRO), labels.chunk(MICRO)):
            (loss_of(model(mb_ids).logits, mb_labels) / MICRO).backward()
        optimizer.step()
    norms.append(_peft_norms(model))
    final = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        logits = model(ids).logits
    return {"state": state, "norms": norms, "final": final, "final_logits": logits}


def prepare(tmp: Path) -> dict:
    for family in ("llama", "qwen2"):
        save_tiny(TINY_CONFIGS[family], tmp / family)
    ids, labels = _batch(TINY_CONFIGS["llama"]["vocab_size"])
    torch.save({"ids": ids, "labels": labels, **dora_reference(ids, labels)}, tmp / "dora_ref.pt")
    return {family: str(tmp / family) for family in ("llama", "qwen2")}


def _input_gradients_everywhere(model, through_embedding: bool = False) -> None:
    """Make the embedding output require grad, so that every layer computes its input gradient
    (the frozen base's backward: input gradients only). ``through_embedding``: the backward goes
    on through the embedding (its weight requires grad), as it must when the embedding is adapted:
    the backward of the embedding's own reduction then runs (an all-gather under SP)."""
    if through_embedding:
        model.embedding.word_embeddings.weight.requires_grad_(True)
    elif hasattr(model, "embedding"):
        model.embedding.register_forward_hook(lambda _m, _i, out: out.requires_grad_() if not out.requires_grad else out)


def _counted_step(model, ids, labels) -> tuple[dict, dict]:
    with count_collectives() as step:
        forward_backward(model, ids, labels, num_microbatches=MICRO)
    with count_collectives() as finish:
        finalize_grads(model)
    return step.counts(), finish.counts()


def _difference(ours: dict, base: dict) -> dict:
    keys = set(ours) | set(base)
    return {k: ours.get(k, 0) - base.get(k, 0) for k in keys if ours.get(k, 0) != base.get(k, 0)}


@check("tp2", "tp2-sp")
def an_adapted_layer_adds_no_collective(ctx):
    tp = tuple(torch.distributed.get_process_group_ranks(ctx.groups.tp_group))
    bucket = {("allreduce_", tp): 1}
    for name, (family, config) in COUNTED.items():
        ids, labels = _batch(TINY_CONFIGS[family]["vocab_size"])
        frozen = models.from_pretrained(ctx.data[family])
        for param in frozen.parameters():
            param.requires_grad_(False)
        _input_gradients_everywhere(frozen, through_embedding="embed_tokens" in config["target_modules"])
        frozen_step, frozen_finish = _counted_step(frozen, ids, labels)
        assert frozen_step, frozen_step

        model = models.from_pretrained(ctx.data[family])
        apply_lora(model, LoraConfig(**config))
        _input_gradients_everywhere(model)
        step, finish = _counted_step(model, ids, labels)
        # DoRA on row layers: the stage's squared partial norms, once per step, in one all-reduce.
        expected_step = bucket if config.get("use_dora") else {}
        assert _difference(step, frozen_step) == expected_step, \
            f"{name}: forward/backward collectives differ from the frozen base: {_difference(step, frozen_step)}"
        # The partial-sum gradients of every layer and micro-batch: one bucket, one all-reduce.
        assert _difference(finish, frozen_finish) == bucket, f"{name}: finalize_grads ran {finish}, expected {bucket}"
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name


def _global_norms(ctx, model) -> dict[str, torch.Tensor]:
    """The held norm of every local DoRA slot, gathered over TP into its global [out], by HF name."""
    out = {}
    for _, layer in adapter_layers(model):
        for factors in layer.factors_of("default").values():
            cached = getattr(factors, "norm_cache", None)
            assert cached is not None, f"{factors.slot.hf_names} has no held norm"
            shards = all_gather_tensors(cached[2], ctx.groups.tp_group)
            out[factors.slot.hf_names[0]] = factors.slot.b_layout.gather(shards)
    return out


@check("tp2", "tp2-sp", "pp2")
def dora_norm_is_computed_once_per_step_and_equals_peft(ctx):
    ref = torch.load(Path(ctx.tmp) / "dora_ref.pt")
    model = models.from_pretrained(ctx.data["llama"])
    apply_lora(model, LoraConfig(**DORA))
    set_adapter_state_dict(model, ref["state"])
    slots = sum(len(layer.factors_of("default")) for _, layer in adapter_layers(model))
    real, calls = dora.partial_norm_squares, []

    def counted(*args, **kwargs):  # the real computation, counted
        calls.append(1)
        return real(*args, **kwargs)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=0.01, eps=ADAM_EPS)
    dora.partial_norm_squares = counted
    try:
        for step in range(STEPS):
            calls.clear()
            optimizer.zero_grad()
            forward_backward(model, ref["ids"], ref["labels"], num_microbatches=MICRO)
            finalize_grads(model)
            assert len(calls) == slots, f"step {step}: {len(calls)} norm computations for {slots} DoRA slots"
            norms = _global_norms(ctx, model)
            expected = {k: v for k, v in ref["norms"][step].items() if k in norms}
            assert sorted(norms) == sorted(expected) and norms, (sorted(norms), sorted(expected))
            worst = max(expected, key=lambda k: rel_error(norms[k], expected[k]))
            assert rel_error(norms[worst], expected[worst]) <= 1e-5, (step, worst)
            optimizer.step()
    finally:
        dora.partial_norm_squares = real
    ref_final = {k: v for k, v in ref["final"].items() if not k.endswith("base_layer.weight")}
    final = adapter_state_dict(model)
    worst = max(ref_final, key=lambda k: rel_error(final[k], ref_final[k]))
    assert rel_error(final[worst], ref_final[worst]) <= 1e-4, worst
    # Outside forward_backward nothing is held: a changed adapter changes the logits at once.
    set_adapter_state_dict(model, ref["final"])
    assert rel_error(models.logits(model, ref["ids"]), ref["final_logits"]) <= 1e-5
    set_adapter_state_dict(model, ref["state"])
    assert rel_error(models.logits(model, ref["ids"]), ref["final_logits"]) > 1e-3


test_collectives_and_dora_norm = distributed_tests(__name__, world_size=2, prepare=prepare)
