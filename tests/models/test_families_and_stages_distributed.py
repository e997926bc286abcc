"""Qwen3, Gemma 3 and uneven pipeline stages against transformers + peft, in one 4-rank launch.

The parent builds tiny random checkpoints (``dist_lora.testing.tiny``) and records what
transformers and peft compute on one process in float32: base logits; a peft LoRA on every
linear layer with random (non-zero) A and B, its logits, its saved directory and
``merge_and_unload``'s weights; and, for the uneven Llamas, a training step's loss and adapter
gradients. Workers load the checkpoints into Megatron on each layout and must reproduce all of it.

Layouts, in the order they run (world size 4): ``tp1-pp2`` = PP2 x DP2, ``tp2-pp2``, ``tp1`` = DP4,
``tp2`` = TP2 x DP2, ``tp2-sp`` = TP2 + SP x DP2. Uneven stages: the 3-layer Llama at PP=2 holds
layers [2, 1], the 5-layer one [3, 2] (balanced automatically) or [1, 4]
(``first_stage_layers=1``); Gemma 3's 3 layers (sliding, sliding, full) split [2, 1] too, so its
last stage holds the full-attention layer by its global number. Checkpoints saved on the uneven
layouts are loaded on the even (PP=1) ones that run later in the same processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import dist_lora as dl
from dist_lora import models
from dist_lora.checkpoint.offline_reshard import reshard_checkpoint
from dist_lora.checkpoint.peft_to_sharded import peft_to_sharded
from dist_lora.checkpoint.sharded import read_manifest
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.parallel.agreement import RankError, on_every_rank
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import reference_run, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

LAYOUTS = ("tp1-pp2", "tp2-pp2", "tp1", "tp2", "tp2-sp")
FAMILIES = {
    "qwen3": TINY_CONFIGS["qwen3"],
    "qwen3_tied": dict(TINY_CONFIGS["qwen3"], tie_word_embeddings=True),
    "gemma3": TINY_CONFIGS["gemma3"],
}
UNEVEN = {name: TINY_CONFIGS[name] for name in ("llama_3_layers", "llama_5_layers")}
MODELS = {**FAMILIES, **UNEVEN}
# The layouts each model is checked on (the uneven Llamas where PP makes their stages uneven).
CHECKED_ON = {
    "qwen3": LAYOUTS,
    "qwen3_tied": ("tp1-pp2", "tp2-pp2", "tp2"),
    "gemma3": ("tp1-pp2", "tp1", "tp2", "tp2-sp"),
    "llama_3_layers": ("tp1-pp2", "tp2-pp2"),
    "llama_5_layers": ("tp1-pp2", "tp2-pp2"),
}
PEFT_LOADS_EXPORT_ON = ("tp2-pp2", "tp2-sp")  # elsewhere the export is compared with peft's files only
SAVES_MERGED_ON = ("tp2-pp2", "tp2")
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
BATCH, SEQ, TOL = 4, 12, 1e-5  # logits on the first 2 rows, training on all 4 (split over DP)


def _ids(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def prepare(tmp: Path) -> dict:
    import peft

    data = {}
    for name, config in MODELS.items():
        base = save_tiny(config, tmp / name)
        ids = _ids(config["vocab_size"])[0][:2]
        with torch.no_grad():
            base_logits = base(ids).logits
        lora = peft.get_peft_model(base, peft.LoraConfig(**LORA))
        lora.save_pretrained(tmp / "peft" / name)
        with torch.no_grad():
            lora_logits = lora.eval()(ids).logits
        merged = {k: v.clone() for k, v in lora.merge_and_unload().state_dict().items()}
        torch.save({"ids": ids, "base": base_logits, "lora": lora_logits}, tmp / f"ref_{name}.pt")
        torch.save(merged, tmp / f"merged_{name}.pt")
        data[name] = str(tmp / name)
    for name in UNEVEN:  # one training step: loss and every adapter gradient
        ids, labels = _ids(UNEVEN[name]["vocab_size"])
        ref = reference_run(name, LORA, ids, labels, steps=1)
        torch.save({"ids": ids, "labels": labels, **ref}, tmp / f"train_{name}.pt")
    only_config = tmp / "config_only"  # a model directory without weights: layout errors come first
    only_config.mkdir()
    (only_config / "config.json").write_text((tmp / "llama_3_layers" / "config.json").read_text())
    data["config_only"] = str(only_config)
    return data


def _ref(ctx, name: str) -> dict:
    return torch.load(Path(ctx.tmp) / f"ref_{name}.pt")


def _peft_dir(ctx, name: str) -> Path:
    return Path(ctx.tmp) / "peft" / name


def _mine(ctx, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.chunk(ctx.groups.dp_size)[ctx.groups.dp_rank]


def _models(ctx) -> list[str]:
    return [name for name, layouts in CHECKED_ON.items() if ctx.layout.name in layouts]


def _stages(ctx, model) -> list[int]:
    """Layers per stage as built (every stage's decoder length, gathered over PP)."""
    mine = (ctx.groups.pp_rank, len(model.decoder.layers))
    return [n for _, n in sorted(set(all_gather_object(mine)))]


@check(*LAYOUTS)
def base_logits_match_transformers(ctx):
    expected_stages = {"llama_3_layers": [2, 1], "llama_5_layers": [3, 2], "gemma3": [2, 1]}
    for name in _models(ctx):
        model = models.from_pretrained(ctx.data[name])
        if ctx.groups.pp_size == 2 and name in expected_stages:
            assert _stages(ctx, model) == expected_stages[name], (name, _stages(ctx, model))
        ref = _ref(ctx, name)
        err = rel_error(models.logits(model, ref["ids"]), ref["base"])
        assert err <= TOL, f"{name} on {ctx.layout.name}: relative error {err:.2e}"
    if ctx.groups.pp_size == 2:  # the stage map set in the API
        model = models.from_pretrained(ctx.data["llama_5_layers"], first_stage_layers=1)
        assert _stages(ctx, model) == [1, 4]
        ref = _ref(ctx, "llama_5_layers")
        assert rel_error(models.logits(model, ref["ids"]), ref["base"]) <= TOL


def _saved_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for f in files for k, v in load_file(path / f).items()}


def _same_files(peft_dir: Path, ours: Path) -> None:
    theirs, mine = load_file(peft_dir / "adapter_model.safetensors"), load_file(ours / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(mine), sorted(set(theirs) ^ set(mine))
    for key, tensor in theirs.items():
        assert torch.equal(tensor, mine[key]), key


@check(*LAYOUTS)
def peft_lora_imports_merges_and_exports(ctx):
    """A peft LoRA (all linear layers, random A and B) imported onto the layout gives peft's
    logits; exported, it is peft's files bit for bit and peft loads it with the same logits;
    merged, the model gives the same logits and saves peft's merge_and_unload weights (peft's
    own load of the export and the saved merged weights: on the layouts named above)."""
    for name in _models(ctx):
        ref = _ref(ctx, name)
        model = models.from_pretrained(ctx.data[name])
        dl.import_peft(model, _peft_dir(ctx, name))
        err = rel_error(models.logits(model, ref["ids"]), ref["lora"])
        assert err <= TOL, f"{name} imported on {ctx.layout.name}: relative error {err:.2e}"
        out = Path(ctx.tmp) / f"export_{name}_{ctx.layout.name}"
        dl.export_peft(model, out)
        with on_every_rank(f"checking the export of {name}"):  # rank 0 checks, every rank raises
            if ctx.groups.rank == 0:
                _same_files(_peft_dir(ctx, name), out)
                if ctx.layout.name in PEFT_LOADS_EXPORT_ON:
                    import peft  # rank 0 only: importing peft costs seconds

                    loaded = peft.PeftModel.from_pretrained(hf_model(MODELS[name]), out).eval()
                    with torch.no_grad():
                        assert rel_error(loaded(ref["ids"]).logits, ref["lora"]) <= TOL, name
        model = dl.merge_and_unload(model)
        err = rel_error(models.logits(model, ref["ids"]), ref["lora"])
        assert err <= TOL, f"{name} merged on {ctx.layout.name}: relative error {err:.2e}"
        if ctx.layout.name not in SAVES_MERGED_ON:
            continue
        merged_dir = Path(ctx.tmp) / f"merged_{name}_{ctx.layout.name}"
        models.save_pretrained(model, merged_dir)
        with on_every_rank(f"checking the merged weights of {name}"):
            if ctx.groups.rank == 0:
                saved, merged = _saved_weights(merged_dir), torch.load(Path(ctx.tmp) / f"merged_{name}.pt")
                assert set(saved) <= set(merged) and "model.layers.0.self_attn.q_proj.weight" in saved
                for key, tensor in saved.items():
                    assert torch.allclose(tensor, merged[key], rtol=1e-5, atol=1e-6), (name, key)


@check("tp1-pp2", "tp2-pp2")
def uneven_stages_train_with_peft_gradients(ctx):
    """One training step on uneven stages (balanced, and first_stage_layers=1 for 5 layers):
    loss and every adapter gradient equal peft's."""
    runs = [("llama_3_layers", None), ("llama_5_layers", None), ("llama_5_layers", 1)]
    for name, first in runs:
        ref = torch.load(Path(ctx.tmp) / f"train_{name}.pt")
        model = models.from_pretrained(ctx.data[name], first_stage_layers=first)
        dl.apply_lora(model, dl.LoraConfig(**LORA))
        dl.set_adapter_state_dict(model, ref["state"])
        loss = forward_backward(model, _mine(ctx, ref["ids"]), _mine(ctx, ref["labels"]), num_microbatches=2)
        finalize_grads(model)
        losses = [v for tp, pp, v in all_gather_object((ctx.groups.tp_rank, ctx.groups.pp_rank, loss.item()))
                  if (tp, pp) == (ctx.groups.tp_rank, ctx.groups.pp_rank)]
        mean = sum(losses) / len(losses)
        assert abs(mean - ref["loss"].item()) <= TOL * ref["loss"].item(), (name, first, mean, ref["loss"].item())
        grads = dl.adapter_state_dict(model, gradients=True)
        assert sorted(grads) == sorted(ref["grads"]), (name, sorted(set(grads) ^ set(ref["grads"])))
        worst = max(grads, key=lambda k: rel_error(grads[k], ref["grads"][k]))
        assert rel_error(grads[worst], ref["grads"][worst]) <= TOL, (name, first, worst)


def _checkpoint(ctx, name: str) -> Path:
    return Path(ctx.tmp) / f"ckpt_{name}_uneven"


@check("tp1-pp2", "tp2-pp2", "tp2")
def checkpoints_saved_on_uneven_stages_load_on_even_ones(ctx):
    """tp1-pp2 saves the 3-layer adapter ([2, 1]) and tp2-pp2 the 5-layer one ([3, 2]); rank 0 re-lays
    the latter offline for [1, 4] and converts the peft adapter offline for [3, 2]; tp2-pp2 loads
    those with first_stage_layers=1 / balanced, and tp2 (PP=1) loads both uneven checkpoints."""
    name = {"tp1-pp2": "llama_3_layers", "tp2-pp2": "llama_5_layers"}.get(ctx.layout.name)
    if name is not None:
        model = models.from_pretrained(ctx.data[name])
        dl.import_peft(model, _peft_dir(ctx, name))
        dl.save_adapter(model, _checkpoint(ctx, name))
        stages = {"llama_3_layers": [2, 1], "llama_5_layers": [3, 2]}[name]
        layout = read_manifest(_checkpoint(ctx, name))["layout"]
        assert layout == {"tp": ctx.groups.tp_size, "pp": 2, "stage_layers": stages}, layout
    if ctx.layout.name == "tp2-pp2":
        relaid, converted = Path(ctx.tmp) / "ckpt_5_first1", Path(ctx.tmp) / "ckpt_5_from_peft"
        with on_every_rank("offline re-layout"):
            if ctx.groups.rank == 0:
                reshard_checkpoint(_checkpoint(ctx, name), relaid, tp=2, pp=2, first_stage_layers=1)
                peft_to_sharded(_peft_dir(ctx, name), ctx.data[name], converted, tp=2, pp=2)
                assert read_manifest(relaid)["layout"]["stage_layers"] == [1, 4]
        ref = _ref(ctx, name)
        for path, first in ((relaid, 1), (converted, None)):
            model = models.from_pretrained(ctx.data[name], first_stage_layers=first)
            dl.load_adapter(model, path)
            assert rel_error(models.logits(model, ref["ids"]), ref["lora"]) <= TOL, path.name
    if ctx.layout.name == "tp2":
        for name in UNEVEN:
            model = models.from_pretrained(ctx.data[name])
            dl.load_adapter(model, _checkpoint(ctx, name))
            ref = _ref(ctx, name)
            assert rel_error(models.logits(model, ref["ids"]), ref["lora"]) <= TOL, name
            out = Path(ctx.tmp) / f"export_even_{name}"
            dl.export_peft(model, out)
            with on_every_rank(f"checking the export of {name}"):
                if ctx.groups.rank == 0:
                    _same_files(_peft_dir(ctx, name), out)


def _fails_everywhere(call, needles: tuple[str, ...]) -> None:
    try:
        call()
    except (RankError, ValueError) as err:
        message = str(err)
    else:
        message = None
    messages = all_gather_object(message)
    assert all(m is not None and all(n in m for n in needles) for m in messages), messages


@check("tp1-pp2")
def layouts_that_cannot_hold_the_model_fail_before_any_weight_is_read(ctx):
    """A first stage that leaves the last one empty fails on every rank with the valid choices;
    the same on a directory without weights fails on the layout, not on the missing files."""
    for path in (ctx.data["llama_3_layers"], ctx.data["config_only"]):
        _fails_everywhere(lambda: models.from_pretrained(path, first_stage_layers=3),
                          ("first_stage_layers=3", "valid first_stage_layers values here: 1, 2"))
    _fails_everywhere(lambda: models.from_pretrained(ctx.data["config_only"], last_stage_layers=0),
                      ("last_stage_layers=0 must be a positive number of layers",))


test_families_and_stages_distributed = distributed_tests(__name__, world_size=4, prepare=prepare)
