"""Recipe paths: relative to the recipe file when written in it, to the working directory when given
on the command line; made absolute and checked (inputs exist, outputs can be made) before any rank starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dist_lora.recipes import paths
from dist_lora.recipes.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def _recipe(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "model.json").write_text((ROOT / "configs" / "tiny_llama.json").read_text())
    (folder / "text.txt").write_text("hello " * 100)
    recipe = folder / "recipe.yaml"
    recipe.write_text("model: {demo_config: model.json}\ndata: {path: text.txt, tokenizer: bytes}\n"
                      "output: {dir: ../runs/x}\nlora: {r: 2, target_modules: [q_proj]}\n")
    return recipe


def test_paths_in_the_file_are_relative_to_it_and_on_the_command_line_to_the_working_directory(tmp_path,
                                                                                             monkeypatch):
    recipe = _recipe(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(recipe, ["checkpoint.dir=ckpt"])
    assert config.model.demo_config == str(tmp_path / "recipes" / "model.json")
    assert config.data.path == str(tmp_path / "recipes" / "text.txt")
    assert config.output.dir == str(tmp_path / "runs" / "x")
    assert config.checkpoint.dir == str(elsewhere / "ckpt")  # an override: the working directory
    paths.check(config)
    overridden = load_config(recipe, ["data.path=text.txt"])
    assert overridden.data.path == str(elsewhere / "text.txt")
    with pytest.raises(ValueError, match=r"data.path=.*elsewhere/text.txt: no such file"):
        paths.check(overridden)


def test_an_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    config = load_config(_recipe(tmp_path), [f"output.dir={tmp_path / 'file' / 'out'}"])
    with pytest.raises(ValueError, match=r"output.dir=.*file/out: .*file exists and is not a directory"):
        paths.check(config)


def test_the_bundled_demo_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO)
    paths.check(config)
    assert config.output.dir == str(ROOT / "runs" / "demo") and config.data.path == str(ROOT / "data" / "demo.txt")


def test_a_missing_input_stops_the_launcher_before_any_rank_starts(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), "--config", str(DEMO),
                           "model.demo_config=nowhere.json"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"config error: model.demo_config={tmp_path / 'nowhere.json'}: no such file" in done.stderr


def test_the_main_job_finds_its_model_data_and_validation_file_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(ROOT / "configs" / "smollm2_dates.yaml", ["data.cache_dir=cache"])
    assert config.model.hf_dir == str(ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct")
    assert config.data.eval_path == str(ROOT / "data" / "dates_eval.jsonl")
    assert config.data.cache_dir == str(tmp_path / "cache")
    assert config.output.dir == str(ROOT / "runs" / "smollm2_dates")
    missing = load_config(ROOT / "configs" / "smollm2_dates.yaml", ["data.eval_path=held_out.jsonl"])
    with pytest.raises(ValueError, match=r"data.eval_path=.*held_out.jsonl: no such file"):
        paths.check(missing)
