"""The dist-lora command line on a checkpoint of a plain (single-process) model."""

from __future__ import annotations

import peft
import torch
from safetensors.torch import load_file

import dist_lora as dl
from dist_lora.cli import main
from dist_lora.testing.tiny import TINY_CONFIGS, hf_model


def _checkpoint(tmp_path):
    model = hf_model(TINY_CONFIGS["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    dl.save_adapter(model, tmp_path / "ckpt")
    return model


def test_inspect_reports_and_verifies(tmp_path, capsys):
    _checkpoint(tmp_path)
    assert main(["inspect", str(tmp_path / "ckpt"), "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out
    assert "TP=1 PP=1" in out and "r=4" in out and "dora=True" in out and " ok" in out
    shard = next((tmp_path / "ckpt").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    assert main(["inspect", str(tmp_path / "ckpt"), "--no-progress"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_convert_writes_a_peft_adapter_and_never_overwrites(tmp_path, capsys):
    model = _checkpoint(tmp_path)
    out = tmp_path / "peft"
    assert main(["convert", str(tmp_path / "ckpt"), str(out), "--base-model", "tiny"]) == 0
    loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), out).eval()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    before = load_file(out / "adapter_model.safetensors")
    assert main(["convert", str(tmp_path / "ckpt"), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert load_file(out / "adapter_model.safetensors").keys() == before.keys()
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_verify_compares_with_peft(tmp_path, capsys):
    from dist_lora.testing.tiny import save_tiny

    save_tiny(TINY_CONFIGS["llama"], tmp_path / "base")
    _checkpoint(tmp_path)
    assert main(["verify", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "ckpt"), "--seq", "8"]) == 0
    assert "OK" in capsys.readouterr().out
    reference = peft.get_peft_model(hf_model(TINY_CONFIGS["llama"]),
                                    peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    reference.save_pretrained(tmp_path / "peft")
    assert main(["verify", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "peft"), "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "max |logits(dist_lora) - logits(peft)|" in out and "OK" in out


def test_non_default_adapters_export_to_a_subfolder_like_peft(tmp_path):
    model = hf_model(TINY_CONFIGS["llama"])
    dl.apply_lora(model, dl.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    dl.add_adapter(model, dl.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "other")
    dl.export_peft(model, tmp_path / "out")
    dl.export_peft(model, tmp_path / "out", adapter_name="other", overwrite=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "other" / "adapter_model.safetensors").is_file()
    dl.set_adapter(model, "other")
    ids = torch.randint(0, 101, (1, 6))
    loaded = peft.PeftModel.from_pretrained(hf_model(TINY_CONFIGS["llama"]), tmp_path / "out" / "other").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_convert_lays_a_peft_adapter_out_on_uneven_pipeline_stages(tmp_path, capsys):
    """`convert PEFT OUT --base HF --pp 2 --first-stage-layers 1`: layer 0 on stage 0, layers 1-2
    on stage 1; a map that leaves a stage empty is refused with the valid values."""
    from dist_lora.testing.tiny import save_tiny

    config = TINY_CONFIGS["llama_3_layers"]
    base = save_tiny(config, tmp_path / "base")
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "peft")
    out = tmp_path / "pp2"
    assert main(["convert", str(tmp_path / "peft"), str(out), "--base", str(tmp_path / "base"), "--pp", "2",
                 "--first-stage-layers", "1"]) == 0
    layers = {f: sorted({k.split(".")[2] for k in load_file(out / f)}) for f in
              ("adapter-tp00-pp00.safetensors", "adapter-tp00-pp01.safetensors")}
    assert layers == {"adapter-tp00-pp00.safetensors": ["0"], "adapter-tp00-pp01.safetensors": ["1", "2"]}
    assert main(["inspect", str(out), "--no-progress"]) == 0
    assert "PP=2 (layers per stage: 1, 2)" in capsys.readouterr().out
    assert main(["convert", str(out), str(tmp_path / "bad"), "--pp", "2", "--first-stage-layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "first_stage_layers=3" in err and "valid first_stage_layers values here: 1, 2" in err
    assert not (tmp_path / "bad").exists()
