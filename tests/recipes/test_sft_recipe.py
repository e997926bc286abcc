"""The recipe on chat / completion data end to end (torchrun, 2 data-parallel ranks): its
first-step loss equals transformers on the same global batch with labels -100 on masked tokens,
validation rows and held-out answers are written, and bad data stops every rank before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_lora.recipes.config import load_config
from dist_lora.recipes.finetune import check
from dist_lora.testing.tiny import TINY_CONFIGS
from tests.recipes.sft_fixtures import (
    chat_records,
    completion_records,
    make_base,
    reference_document,
    shifted,
    write_jsonl,
    write_recipe,
)
from tests.recipes.test_finetune import ROOT, TORCHRUN, run_recipe, validation_rows

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("recipe_base"))


def _reference_loss(base: Path, records: list[dict], fmt: str) -> tuple[float, int]:
    """transformers on the documents, one at a time: summed token loss / counted tokens."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            ids, labels = shifted(*reference_document(tokenizer, record, fmt))
            logits = model(ids.unsqueeze(0)).logits[0]
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count, count


@pytest.mark.parametrize("fmt,packing,seq_len", [("chat", False, 96), ("completion", True, 48)])
def test_first_step_loss_is_the_token_mean_of_transformers_and_validation_is_logged(tmp_path, base, fmt, packing,
                                                                                    seq_len):
    records = (chat_records() if fmt == "chat" else completion_records()) * 2
    train = write_jsonl(tmp_path / "train.jsonl", records)
    held = records[:3]
    evaluation = write_jsonl(tmp_path / "eval.jsonl", held)
    recipe = write_recipe(tmp_path / "recipe.yaml", base, train, fmt, evaluation,
                          **{"data.seq_len": seq_len, "train.steps": 4, "train.eval_every": 2, "output.answer_prompts": 2,
                             "output.max_new_tokens": 4, "data.packing": packing})
    rows = run_recipe(tmp_path, "run", config=recipe, env=ENV)
    step_docs = records[:8] if not packing else None  # 2 ranks x 2 micro-batches x 2 rows
    if step_docs is None:  # packed: next-fit of whole documents into rows of seq_len positions
        tokenizer = AutoTokenizer.from_pretrained(base)
        lengths = [len(reference_document(tokenizer, r, fmt)[0]) - 1 for r in records]
        rows_used, used, step_docs = 1, 0, []
        for record, length in zip(records, lengths):
            if used + length > seq_len:
                rows_used, used = rows_used + 1, 0
            if rows_used > 8:
                break
            step_docs.append(record)
            used += length
    expected, _ = _reference_loss(base, step_docs, fmt)
    assert abs(rows[0]["loss"] - expected) <= 1e-5 * expected, (rows[0]["loss"], expected)
    val = validation_rows(tmp_path, "run")
    held_loss, held_tokens = _reference_loss(base, held, fmt)
    assert [r["step"] for r in val] == [0, 2, 4] and val[0]["val_tokens"] == held_tokens
    assert abs(val[0]["val_loss"] - held_loss) <= 1e-5 * held_loss
    answers = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert [a["where"] for a in answers] == [f"{evaluation}:1", f"{evaluation}:2"]
    assert answers[0]["reference"] == (held[0]["messages"][-1]["content"] if fmt == "chat" else held[0]["completion"])
    assert (tmp_path / "run" / "loss.png").is_file()


def test_bad_data_stops_every_rank_before_training_naming_file_line_and_field(tmp_path, base):
    records = chat_records()
    records[4] = {"messages": [{"role": "user", "content": "no answer here"}]}
    train = write_jsonl(tmp_path / "train.jsonl", records)
    recipe = write_recipe(tmp_path / "recipe.yaml", base, train, "chat", **{"data.seq_len": 96})
    out = tmp_path / "run"
    result = subprocess.run([*TORCHRUN, str(ROOT / "launch" / "finetune.py"), "--config", str(recipe),
                             f"output.dir={out}", f"checkpoint.dir={out / 'checkpoints'}"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    message = f"{train}:5: field 'messages' has no assistant turn"
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert result.stderr.count(message) == 1, "said once (rank 0), not once per rank"
    assert not (out / "metrics.jsonl").exists(), "a rank trained"


def test_packing_is_refused_for_a_sliding_window_model_before_ranks_start(tmp_path, base):
    mistral = tmp_path / "mistral.json"
    mistral.write_text(json.dumps(TINY_CONFIGS["mistral"]))
    train = write_jsonl(tmp_path / "train.jsonl", chat_records())
    recipe = write_recipe(tmp_path / "recipe.yaml", base, train, "chat", **{"data.packing": True})
    config = load_config(recipe, ["model.hf_dir=null", f"model.demo_config={mistral}"])
    with pytest.raises(ValueError, match=r"data.packing with a sliding-window model \(sliding_window=5\)"):
        check(config)
    check(load_config(recipe))  # the Llama base: packing is fine
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), "--config", str(recipe),
                          "model.hf_dir=null", f"model.demo_config={mistral}"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "data.packing with a sliding-window model" in out.stderr
