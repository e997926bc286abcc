"""What leaves a trained sharded model must be what was trained (issue 19), in one 2-rank launch.

* ``bias="lora_only"`` on Qwen2's fused q/k/v bias with q / v targets: only the q and v rows
  train (AdamW's decoupled weight decay never reaches k's rows), and the export loaded by PEFT,
  its merged release loaded by transformers and a reloaded sharded checkpoint give the trained
  model's logits.
* ``bias="all"`` on a Megatron model: every trained bias travels (export, checkpoint).
* the default adapter exported into a directory holding another adapter's sub-folder replaces
  only its own two files.
* a tied-embedding model with ``modules_to_save=["lm_head"]``, at PP=1 and PP=2: merge_and_unload
  unties the head and ``save_pretrained`` writes it with ``tie_word_embeddings=False`` (as PEFT);
  a refused merge_and_unload changes nothing (a tied head untied for the merge is tied back).
* PEFT -> sharded checkpoint -> PEFT keeps ``adapter_config.json`` as PEFT wrote it.

Layouts: ``tp2`` (TP=2, PP=1), ``tp2-sp`` (with sequence parallelism) and ``pp2`` (PP=2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_lora as dl
from dist_lora import models
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import adapter_layers, saved_modules
from dist_lora.models.hf_checkpoint import HFCheckpoint
from dist_lora.models.training import finalize_grads, forward_backward
from dist_lora.parallel.agreement import RankError
from dist_lora.parallel.collectives import all_gather_object
from dist_lora.testing import check, distributed_tests
from dist_lora.testing.peft_reference import peft_model, rel_error
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model, save_tiny

TOL = 1e-5
ROUND_TRIP = {
    "lists_and_patterns": dict(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj", "down_proj"],
                               rank_pattern={"down_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
                               modules_to_save=["lm_head"], lora_dropout=0.1, task_type="CAUSAL_LM"),
    "layers_to_transform": dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[1],
                                layers_pattern="layers", use_rslora=True),
    "regex": dict(r=2, lora_alpha=16, target_modules=r".*\.(q|v)_proj"),
    "all_linear_excluded": dict(r=2, lora_alpha=2, target_modules="all-linear", exclude_modules=["down_proj"]),
}


def _ids(vocab: int, batch: int = 2):
    return torch.randint(0, vocab, (batch, 8), generator=torch.Generator().manual_seed(19))


def prepare(tmp: Path) -> dict:
    save_tiny(TINY_CONFIGS["qwen2"], tmp / "qwen2")
    save_tiny(TINY_CONFIGS["llama"], tmp / "llama")
    for name, config in ROUND_TRIP.items():
        peft_model("llama", dict(config, init_lora_weights=False)).save_pretrained(tmp / "peft" / name)
    return {"qwen2": str(tmp / "qwen2"), "llama": str(tmp / "llama")}


def _train(ctx, model, family: str, steps: int = 5, weight_decay: float = 0.1):
    ids = _ids(TINY_CONFIGS[family]["vocab_size"], batch=4)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        forward_backward(model, ids, ids.roll(-1, dims=1), num_microbatches=2 if ctx.groups.pp_size > 1 else 1)
        finalize_grads(model)
        optimizer.step()
    return models.logits(model, _ids(TINY_CONFIGS[family]["vocab_size"]))


def _on_rank0(ctx, check) -> None:
    """Run ``check()`` on global rank 0 only; its failure fails every rank (none waits alone)."""
    error = None
    if ctx.groups.rank == 0:
        try:
            check()
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = f"{type(err).__name__}: {err}"
    errors = [e for e in all_gather_object(error) if e]
    assert not errors, errors[0]


def _peft_logits(out: Path, family: str) -> torch.Tensor:
    import peft

    loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS[family]), out).eval()
    with torch.no_grad():
        return loaded(_ids(TINY_CONFIGS[family]["vocab_size"])).logits


def _transformers_logits(path: Path, family: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return loaded(_ids(TINY_CONFIGS[family]["vocab_size"])).logits


def _reloaded_logits(ctx, family: str, path: Path) -> torch.Tensor:
    fresh = models.from_pretrained(ctx.data[family])
    dl.load_adapter(fresh, path)
    return models.logits(fresh, _ids(TINY_CONFIGS[family]["vocab_size"]))


@check("tp2", "tp2-sp")
def lora_only_fused_bias_trains_only_the_targeted_rows_and_releases_what_was_trained(ctx):
    from dist_lora.checkpoint.merge_release import merge_release

    model = models.from_pretrained(ctx.data["qwen2"])
    dl.apply_lora(model, dl.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only",
                                       init_lora_weights=False))
    spec = model.dist_lora.spec
    q_rows, k_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    trainable_bias = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "bias" in n)
    # Per layer and TP rank: the local q rows and v rows, never k's (the only trainable bias elements).
    assert trainable_bias == spec.num_layers * (q_rows + k_rows) // ctx.groups.tp_size, trainable_bias
    before = {n: b.detach().clone() for n, layer in adapter_layers(model) for b in [layer.base_layer.bias]}
    trained = _train(ctx, model, "qwen2")
    for name, layer in adapter_layers(model):
        assert torch.equal(layer.base_layer.bias, before[name]), f"{name}: a frozen bias row changed"
    out = Path(ctx.tmp) / f"lora_only_export_{ctx.layout.name}"
    dl.export_peft(model, out)
    ckpt = Path(ctx.tmp) / f"lora_only_ckpt_{ctx.layout.name}"
    dl.save_adapter(model, ckpt)

    def released():
        keys = load_file(out / "adapter_model.safetensors")
        biases = sorted(k for k in keys if k.endswith(".bias"))
        assert biases and all(".base_layer.bias" in k and ("q_proj" in k or "v_proj" in k) for k in biases), biases
        assert rel_error(_peft_logits(out, "qwen2"), trained) <= TOL, "PEFT on the export"
        merged = Path(ctx.tmp) / f"lora_only_merged_{ctx.layout.name}"
        merge_release(ctx.data["qwen2"], out, merged, progress=False)
        assert rel_error(_transformers_logits(merged, "qwen2"), trained) <= TOL

    _on_rank0(ctx, released)
    assert rel_error(_reloaded_logits(ctx, "qwen2", ckpt), trained) <= TOL, "the reloaded sharded checkpoint"


@check("tp2")
def bias_all_on_megatron_exports_and_checkpoints_every_trained_bias(ctx):
    model = models.from_pretrained(ctx.data["qwen2"])
    dl.apply_lora(model, dl.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], bias="all",
                                       init_lora_weights=False))
    trained = _train(ctx, model, "qwen2")
    out, ckpt = Path(ctx.tmp) / "bias_all_export", Path(ctx.tmp) / "bias_all_ckpt"
    dl.export_peft(model, out)
    dl.save_adapter(model, ckpt)

    def released():
        biases = [k for k in load_file(out / "adapter_model.safetensors") if k.endswith(".bias")]
        assert len(biases) == 3 * TINY_CONFIGS["qwen2"]["num_hidden_layers"], biases
        assert rel_error(_peft_logits(out, "qwen2"), trained) <= TOL, "PEFT on the export"

    _on_rank0(ctx, released)
    assert rel_error(_reloaded_logits(ctx, "qwen2", ckpt), trained) <= TOL, "the reloaded sharded checkpoint"


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@check("tp2")
def default_export_replaces_only_its_own_files_beside_sibling_adapters(ctx):
    model = models.from_pretrained(ctx.data["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    dl.add_adapter(model, dl.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "other")
    out = Path(ctx.tmp) / "siblings"
    dl.export_peft(model, out, adapter_name="other")
    _on_rank0(ctx, lambda: (out / "README.md").write_text("kept"))
    sibling = _files(out / "other")
    dl.export_peft(model, out)  # the default adapter's files do not exist yet: no overwrite needed
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for factors in layer.factors_of("default").values():
                factors.lora_B.add_(1.0)
    with pytest.raises((RankError, FileExistsError), match="adapter_model.safetensors exists; pass overwrite=True"):
        dl.export_peft(model, out)
    dl.export_peft(model, out, overwrite=True)
    state = dl.adapter_state_dict(model)

    def kept_and_replaced():
        assert _files(out / "other") == sibling, "the sibling adapter changed"
        assert (out / "README.md").read_text() == "kept"
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "other"]
        written = load_file(out / "adapter_model.safetensors")
        assert sorted(written) == sorted(state)
        assert all(torch.equal(written[k], state[k]) for k in state), "the new export was not written"

    _on_rank0(ctx, kept_and_replaced)


TIED_HEADS = {
    "saved_head": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    # LoRA merged into the tied head, or into the embedding the head reads: untied too
    "lora_head_and_embedding": dict(target_modules=["q_proj", "lm_head", "embed_tokens"]),
}


@check("tp2", "pp2")
def tied_head_changed_by_the_merge_is_untied_and_released_as_trained(ctx):
    for name, targets in TIED_HEADS.items():
        model = models.from_pretrained(ctx.data["qwen2"])
        dl.apply_lora(model, dl.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets))
        trained = _train(ctx, model, "qwen2", steps=3, weight_decay=0.0)
        merged = dl.merge_and_unload(model)
        assert not list(adapter_layers(merged)) and not list(saved_modules(merged))
        assert rel_error(models.logits(merged, _ids(96)), trained) <= TOL, name
        out = Path(ctx.tmp) / f"tied_{name}_{ctx.layout.name}"
        models.save_pretrained(merged, out)

        def released(out=out, trained=trained, name=name):
            assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False, name
            assert "lm_head.weight" in HFCheckpoint(out).names(), name
            assert rel_error(_transformers_logits(out, "qwen2"), trained) <= TOL, f"{name}: transformers"

        _on_rank0(ctx, released)


@check("tp2", "pp2")
def refused_merge_and_unload_changes_nothing(ctx):
    for family in ("llama", "qwen2"):  # qwen2 is tied: its head is untied first, and tied back on refusal
        model = models.from_pretrained(ctx.data[family])
        # lora_bias on o_proj, which has no bias to fold it into: refused before anything is merged,
        # unwrapped, untied or written (the saved lm_head copy included).
        dl.apply_lora(model, dl.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_bias=True,
                                           modules_to_save=["lm_head"], init_lora_weights=False))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tied = (getattr(model, "share_embeddings_and_output_weights", None), view(model).spec.tied_embeddings)
        vocab = TINY_CONFIGS[family]["vocab_size"]
        logits = models.logits(model, _ids(vocab))
        with pytest.raises((RankError, RuntimeError), match="lora_bias cannot be merged"):
            dl.merge_and_unload(model)
        after = dict(model.named_parameters())
        assert sorted(after) == sorted(before) and all(torch.equal(after[n], before[n]) for n in before), family
        assert (getattr(model, "share_embeddings_and_output_weights", None),
                view(model).spec.tied_embeddings) == tied, family
        assert list(adapter_layers(model)) and dl.active_adapters(model) == ["default"]
        assert not any(layer.merged_adapters for _, layer in adapter_layers(model))
        assert torch.equal(models.logits(model, _ids(vocab)), logits), family


def _written_config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


@check("tp2")
def peft_to_sharded_to_peft_keeps_adapter_config_as_written(ctx):
    from dist_lora.checkpoint.peft_to_sharded import peft_to_sharded

    for name in ROUND_TRIP:
        source = Path(ctx.tmp) / "peft" / name
        original = _written_config(source)
        model = models.from_pretrained(ctx.data["llama"])
        dl.import_peft(model, source)
        ckpt, live = Path(ctx.tmp) / f"rt_ckpt_{name}", Path(ctx.tmp) / f"rt_live_{name}"
        dl.save_adapter(model, ckpt)
        dl.export_peft(model, live)

        def as_written(name=name, original=original, source=source, ckpt=ckpt, live=live):
            offline, converted = Path(ctx.tmp) / f"rt_offline_{name}", Path(ctx.tmp) / f"rt_conv_peft_{name}"
            dl.export_peft(ckpt, offline)
            dl.export_peft(peft_to_sharded(source, ctx.data["llama"], Path(ctx.tmp) / f"rt_conv_{name}", tp=2),
                           converted)
            for path in (live, offline, converted):
                written = _written_config(path)
                differ = {k: (original.get(k), written.get(k)) for k in set(original) | set(written)
                          if original.get(k) != written.get(k)}
                assert not differ, (name, path.name, differ)

        _on_rank0(ctx, as_written)


test_fidelity_distributed = distributed_tests(__name__, world_size=2, prepare=prepare)
