"""``dist-lora convert-gguf``: architectures it cannot map and files that are not GGUF are refused
before anything is loaded or written, naming the file and the field; the real conversion of
SmolLM2 runs in ``./setup.sh``, whose result is checked here when it is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_lora import models, parallel
from dist_lora.cli import main

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[2]
PREPARED = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"  # written by ./setup.sh with convert-gguf


def _write_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_architecture_is_refused_naming_file_and_field(tmp_path, capsys):
    path = _write_gguf(tmp_path / "gemma.gguf", "gemma3")
    assert main(["convert-gguf", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: GGUF field general.architecture is 'gemma3'" in err
    assert "supported: llama, mistral, qwen2" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_file_that_is_not_gguf_is_named(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    assert main(["convert-gguf", str(path), str(tmp_path / "out")]) == 2
    assert f"{path} is not a readable GGUF file" in capsys.readouterr().err
    assert main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "missing.gguf does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not (PREPARED / "config.json").is_file(), reason="./setup.sh has not prepared SmolLM2")
def test_the_converted_smollm2_has_its_chat_template_and_dist_lora_matches_transformers():
    tokenizer = AutoTokenizer.from_pretrained(PREPARED)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    hf = AutoModelForCausalLM.from_pretrained(PREPARED, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = hf(ids).logits
    assert tokenizer.decode(theirs[0, -1].argmax()).strip() == "Paris"  # the dequantised weights are the model's
    parallel.initialize()
    try:
        ours = models.logits(models.from_pretrained(PREPARED), ids)
    finally:
        parallel.shutdown()
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
